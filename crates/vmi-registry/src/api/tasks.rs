//! `/v2/tasks` and `/v2/images/{id}/tasks`: Glance's tasks API.
//!
//! Every import request (`POST /v2/images/{id}/import`) is recorded as an `api_image_import`
//! task of its image, which `GET /v2/images/{id}/tasks` lists. `POST /v2/tasks` creates the
//! deprecated `import` task type, as Glance still offers it to admins: it creates an image from
//! `input.image_properties` and imports `input.import_from` into it by web-download. A URL the
//! import filter refuses is refused when the task is created (400), as newer Glance does.
//! `GET /v2/tasks` and `GET /v2/tasks/{id}` are admin-only, as Glance's default policy has them.
//!
//! A task's status follows its image: `processing` while the import runs, `success` once the
//! image is active, `failure` (with the import's error as `message`) once the import failed or
//! the image was deleted.

use super::parse_json;
use crate::auth::Context;
use crate::error::{RegistryError, Result};
use crate::model::{now, Status};
use crate::server::App;
use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::routing::get;
use axum::{Json, Router};
use serde_json::{json, Value};
use std::sync::Arc;

use crate::catalog::tasks::TaskRecord;

/// The task type of an import request.
pub const IMAGE_IMPORT: &str = "api_image_import";
/// The task type `POST /v2/tasks` creates.
pub const IMPORT: &str = "import";
/// How long a finished task stays listed, hours (Glance's `task_time_to_live`).
const TIME_TO_LIVE_HOURS: i64 = 48;
/// Default and largest page of `GET /v2/tasks`.
const DEFAULT_LIMIT: u32 = 25;
const MAX_LIMIT: u32 = 1000;

/// The `/v2/tasks` routes.
pub fn router() -> Router<Arc<App>> {
    Router::new()
        .route("/tasks", get(list).post(create))
        .route("/tasks/{id}", get(show))
        .route("/images/{id}/tasks", get(image_tasks))
        .route("/schemas/task", get(task_schema))
        .route("/schemas/tasks", get(tasks_schema))
}

fn bad(msg: impl Into<String>) -> RegistryError {
    RegistryError::BadRequest(msg.into())
}

fn require_admin(ctx: &Context) -> Result<()> {
    if ctx.is_admin() {
        Ok(())
    } else {
        Err(RegistryError::Forbidden(
            "You are not authorized to perform the requested action.".into(),
        ))
    }
}

/// Record a new task of `image_id` with `input`.
pub(crate) async fn record(
    app: &App,
    ctx: &Context,
    image_id: &str,
    task_type: &str,
    input: Value,
) -> Result<TaskRecord> {
    let t = now();
    let task = TaskRecord {
        id: uuid::Uuid::new_v4().hyphenated().to_string(),
        task_type: task_type.to_string(),
        status: "processing".into(),
        owner: ctx.project_id.clone(),
        image_id: Some(image_id.to_string()),
        user_id: Some(ctx.user_id.clone()),
        request_id: Some(format!("req-{}", uuid::Uuid::new_v4().hyphenated())),
        input: input.to_string(),
        result: None,
        message: String::new(),
        created_at: t.clone(),
        updated_at: t,
        expires_at: None,
    };
    app.catalog.put_task(&task).await?;
    Ok(task)
}

/// Bring an unfinished task's status up to date with its image, and store the change.
async fn refresh(app: &App, mut task: TaskRecord) -> Result<TaskRecord> {
    if task.status == "success" || task.status == "failure" {
        return Ok(task);
    }
    let Some(image_id) = task.image_id.clone() else {
        return Ok(task);
    };
    let img = app.catalog.get_image(&image_id).await?;
    let outcome = match &img {
        None => Some(("failure", "The image was deleted".to_string())),
        Some(i) if i.status == Status::Active || i.status == Status::Deactivated => {
            Some(("success", String::new()))
        }
        Some(i) if i.status == Status::Deleted || i.status == Status::PendingDelete => {
            Some(("failure", "The image was deleted".to_string()))
        }
        Some(i)
            if i.status == Status::Queued
                && i.properties
                    .get(crate::import::PROP_FAILED)
                    .is_some_and(|v| !v.is_empty()) =>
        {
            let msg = i
                .properties
                .get(crate::import::PROP_IMPORT_ERROR)
                .cloned()
                .unwrap_or_else(|| "the import failed".into());
            Some(("failure", msg))
        }
        _ => None,
    };
    if let Some((status, message)) = outcome {
        let t = chrono::Utc::now();
        task.status = status.into();
        task.message = message;
        task.result = Some(json!({"image_id": image_id}).to_string());
        task.updated_at = t.format("%Y-%m-%dT%H:%M:%SZ").to_string();
        task.expires_at = Some(
            (t + chrono::Duration::hours(TIME_TO_LIVE_HOURS))
                .format("%Y-%m-%dT%H:%M:%SZ")
                .to_string(),
        );
        app.catalog.put_task(&task).await?;
    }
    Ok(task)
}

fn parse_stored(s: &str) -> Value {
    serde_json::from_str(s).unwrap_or(Value::Null)
}

fn task_json(t: &TaskRecord, full: bool) -> Value {
    let mut v = json!({
        "id": t.id,
        "type": t.task_type,
        "status": t.status,
        "owner": t.owner,
        "expires_at": t.expires_at,
        "created_at": t.created_at,
        "updated_at": t.updated_at,
        "self": format!("/v2/tasks/{}", t.id),
        "schema": "/v2/schemas/task",
    });
    if full {
        v["input"] = parse_stored(&t.input);
        v["result"] = t.result.as_deref().map(parse_stored).unwrap_or(Value::Null);
        v["message"] = json!(t.message);
        v["image_id"] = json!(t.image_id);
        v["user_id"] = json!(t.user_id);
        v["request_id"] = json!(t.request_id);
    }
    v
}

/// `POST /v2/tasks` (admin): an `import` task.
async fn create(
    State(app): State<Arc<App>>,
    ctx: Context,
    body: Bytes,
) -> Result<(StatusCode, Json<Value>)> {
    require_admin(&ctx)?;
    let v = parse_json(&body)?;
    let task_type = v.get("type").and_then(Value::as_str).unwrap_or("");
    if task_type != IMPORT {
        return Err(bad(format!(
            "Invalid type value: '{task_type}'; the only task type is 'import'"
        )));
    }
    let input = v
        .get("input")
        .filter(|i| i.is_object())
        .ok_or_else(|| bad("Task input is required and must be an object"))?;
    let uri = input
        .get("import_from")
        .and_then(Value::as_str)
        .ok_or_else(|| bad("Input does not contain 'import_from' field"))?;
    if input
        .get("import_from_format")
        .and_then(Value::as_str)
        .is_none()
    {
        return Err(bad("Input does not contain 'import_from_format' field"));
    }
    let props = input
        .get("image_properties")
        .filter(|p| p.is_object())
        .ok_or_else(|| bad("Input does not contain 'image_properties' field"))?;
    crate::import::web::validate(&app.config.import.filtering, uri)?;
    let (_, Json(img)) = super::images::create(
        State(app.clone()),
        ctx.clone(),
        Bytes::from(props.to_string()),
    )
    .await?;
    let image_id = img["id"].as_str().unwrap_or_default().to_string();
    let request = json!({"method": {"name": crate::import::WEB_DOWNLOAD, "uri": uri}});
    let mut task = record(&app, &ctx, &image_id, IMPORT, input.clone()).await?;
    if let Err(e) = super::import::start_import(&app, &ctx, &image_id, &request).await {
        task.status = "failure".into();
        task.message = e.to_string();
        task.updated_at = now();
        app.catalog.put_task(&task).await?;
    }
    Ok((StatusCode::CREATED, Json(task_json(&task, true))))
}

/// `GET /v2/tasks` (admin).
async fn list(
    State(app): State<Arc<App>>,
    ctx: Context,
    Query(params): Query<Vec<(String, String)>>,
) -> Result<Json<Value>> {
    require_admin(&ctx)?;
    let mut limit = DEFAULT_LIMIT;
    let mut status = None;
    let mut task_type = None;
    for (k, v) in &params {
        match k.as_str() {
            "limit" => {
                limit = v
                    .parse::<u32>()
                    .map_err(|_| bad("limit param must be a non-negative integer"))?
                    .min(MAX_LIMIT)
            }
            "status" => status = Some(v.clone()),
            "type" => task_type = Some(v.clone()),
            _ => {}
        }
    }
    let mut out = Vec::new();
    for t in app.catalog.list_tasks(None, MAX_LIMIT).await? {
        let t = refresh(&app, t).await?;
        if status.as_ref().is_some_and(|s| *s != t.status)
            || task_type.as_ref().is_some_and(|s| *s != t.task_type)
        {
            continue;
        }
        out.push(task_json(&t, false));
        if out.len() >= limit as usize {
            break;
        }
    }
    Ok(Json(
        json!({"tasks": out, "first": "/v2/tasks", "schema": "/v2/schemas/tasks"}),
    ))
}

/// `GET /v2/tasks/{id}` (admin).
async fn show(
    State(app): State<Arc<App>>,
    ctx: Context,
    Path(id): Path<String>,
) -> Result<Json<Value>> {
    require_admin(&ctx)?;
    let t =
        app.catalog.get_task(&id).await?.ok_or_else(|| {
            RegistryError::NotFound(format!("Task with identifier {id} not found"))
        })?;
    Ok(Json(task_json(&refresh(&app, t).await?, true)))
}

/// `GET /v2/images/{id}/tasks`: the tasks of an image the caller may see.
async fn image_tasks(
    State(app): State<Arc<App>>,
    ctx: Context,
    Path(id): Path<String>,
) -> Result<Json<Value>> {
    super::images::load_visible(&app, &ctx, &id).await?;
    let mut out = Vec::new();
    for t in app.catalog.image_tasks(&id).await? {
        out.push(task_json(&refresh(&app, t).await?, true));
    }
    Ok(Json(json!({"tasks": out})))
}

fn task_schema_value() -> Value {
    json!({
        "name": "task",
        "properties": {
            "id": {"type": "string", "description": "An identifier for the task",
                   "pattern": "^([0-9a-fA-F]){8}-([0-9a-fA-F]){4}-([0-9a-fA-F]){4}-([0-9a-fA-F]){4}-([0-9a-fA-F]){12}$"},
            "type": {"type": "string", "enum": ["import", "api_image_import"],
                     "description": "The type of task represented by this content"},
            "status": {"type": "string",
                       "enum": ["pending", "processing", "success", "failure"],
                       "description": "The current status of this task"},
            "input": {"type": ["null", "object"], "description": "The parameters required by task"},
            "result": {"type": ["null", "object"], "description": "The result of current task"},
            "owner": {"type": "string", "description": "An identifier for the owner of this task"},
            "message": {"type": "string",
                        "description": "Human-readable informative message only included when appropriate"},
            "image_id": {"type": ["null", "string"], "readOnly": true},
            "request_id": {"type": ["null", "string"], "readOnly": true},
            "user_id": {"type": ["null", "string"], "readOnly": true},
            "expires_at": {"type": ["null", "string"],
                           "description": "Datetime when this resource would be subject to removal"},
            "created_at": {"type": "string", "description": "Datetime when this resource was created"},
            "updated_at": {"type": "string", "description": "Datetime when this resource was updated"},
            "self": {"type": "string", "readOnly": true},
            "schema": {"type": "string", "readOnly": true}
        }
    })
}

async fn task_schema(_ctx: Context) -> Json<Value> {
    Json(task_schema_value())
}

async fn tasks_schema(_ctx: Context) -> Json<Value> {
    Json(json!({
        "name": "tasks",
        "properties": {
            "tasks": {"type": "array", "items": task_schema_value()},
            "first": {"type": "string"},
            "next": {"type": "string"},
            "schema": {"type": "string"}
        },
        "links": [
            {"href": "{first}", "rel": "first"},
            {"href": "{next}", "rel": "next"},
            {"href": "{schema}", "rel": "describedby"}
        ]
    }))
}
