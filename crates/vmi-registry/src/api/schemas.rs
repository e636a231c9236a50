//! `/v2/schemas/*`: the JSON schemas clients fetch to validate and build image requests
//! (python-glanceclient validates every patch it sends against `image`). They follow Glance's
//! published schemas: core attributes with their types, read-only markers, and custom
//! properties as `additionalProperties` of type string.

use crate::auth::Context;
use crate::model::{MemberStatus, Status, Visibility, CONTAINER_FORMATS, DISK_FORMATS};
use axum::Json;
use serde_json::{json, Value};

fn nullable_enum(values: &[&str]) -> Value {
    let mut e: Vec<Value> = vec![Value::Null];
    e.extend(values.iter().map(|v| json!(v)));
    json!({"type": ["null", "string"], "enum": e})
}

/// The `image` schema.
pub fn image_schema() -> Value {
    let statuses: Vec<&str> = Status::ALL.iter().map(|s| s.as_str()).collect();
    let visibilities: Vec<&str> = Visibility::ALL.iter().map(|s| s.as_str()).collect();
    let mut disk = nullable_enum(&DISK_FORMATS);
    disk["description"] = json!("Format of the disk");
    let mut container = nullable_enum(&CONTAINER_FORMATS);
    container["description"] = json!("Format of the container");
    json!({
        "name": "image",
        "additionalProperties": {"type": "string"},
        "links": [
            {"href": "{self}", "rel": "self"},
            {"href": "{file}", "rel": "enclosure"},
            {"href": "{schema}", "rel": "describedby"}
        ],
        "properties": {
            "id": {"type": "string", "description": "An identifier for the image",
                   "pattern": "^([0-9a-fA-F]){8}-([0-9a-fA-F]){4}-([0-9a-fA-F]){4}-([0-9a-fA-F]){4}-([0-9a-fA-F]){12}$"},
            "name": {"type": ["null", "string"], "maxLength": 255,
                     "description": "Descriptive name for the image"},
            "status": {"type": "string", "readOnly": true, "enum": statuses,
                       "description": "Status of the image"},
            "visibility": {"type": "string", "enum": visibilities,
                           "description": "Scope of image accessibility"},
            "protected": {"type": "boolean",
                          "description": "If true, image will not be deletable."},
            "os_hidden": {"type": "boolean",
                          "description": "If true, image will not appear in default image list response."},
            "checksum": {"type": ["null", "string"], "readOnly": true, "maxLength": 32,
                         "description": "md5 hash of image contents."},
            "os_hash_algo": {"type": ["null", "string"], "readOnly": true, "maxLength": 64,
                             "description": "Algorithm to calculate the os_hash_value"},
            "os_hash_value": {"type": ["null", "string"], "readOnly": true, "maxLength": 128,
                              "description": "Hexdigest of the image contents using the algorithm specified by the os_hash_algo"},
            "owner": {"type": ["null", "string"], "maxLength": 255,
                      "description": "Owner of the image"},
            "size": {"type": ["null", "integer"], "readOnly": true,
                     "description": "Size of image file in bytes"},
            "virtual_size": {"type": ["null", "integer"], "readOnly": true,
                             "description": "Virtual size of image in bytes"},
            "container_format": container,
            "disk_format": disk,
            "created_at": {"type": "string", "readOnly": true,
                           "description": "Date and time of image registration"},
            "updated_at": {"type": "string", "readOnly": true,
                           "description": "Date and time of the last image modification"},
            "tags": {"type": "array", "items": {"type": "string", "maxLength": 255},
                     "description": "List of strings related to the image"},
            "direct_url": {"type": "string", "readOnly": true,
                           "description": "URL to access the image file kept in external store"},
            "min_ram": {"type": "integer", "minimum": 0,
                        "description": "Amount of ram (in MB) required to boot image."},
            "min_disk": {"type": "integer", "minimum": 0,
                         "description": "Amount of disk space (in GB) required to boot image."},
            "self": {"type": "string", "readOnly": true,
                     "description": "An image self url"},
            "file": {"type": "string", "readOnly": true,
                     "description": "An image file url"},
            "stores": {"type": "string", "readOnly": true,
                       "description": "Store in which image data resides."},
            "schema": {"type": "string", "readOnly": true,
                       "description": "An image schema url"},
            "locations": {"type": "array", "items": {"type": "object"},
                          "description": "A set of URLs to access the image file kept in external store"}
        }
    })
}

/// The `member` schema.
pub fn member_schema() -> Value {
    let statuses: Vec<&str> = [
        MemberStatus::Pending,
        MemberStatus::Accepted,
        MemberStatus::Rejected,
    ]
    .iter()
    .map(|s| s.as_str())
    .collect();
    json!({
        "name": "member",
        "properties": {
            "created_at": {"type": "string", "description": "Date and time of image member creation"},
            "image_id": {"type": "string", "description": "An identifier for the image"},
            "member_id": {"type": "string", "description": "An identifier for the image member (tenantId)"},
            "schema": {"type": "string", "readOnly": true},
            "status": {"type": "string", "enum": statuses, "description": "The status of this image member"},
            "updated_at": {"type": "string", "description": "Date and time of last modification of image member"}
        }
    })
}

/// `GET /v2/schemas/image`
pub async fn image(_ctx: Context) -> Json<Value> {
    Json(image_schema())
}

/// `GET /v2/schemas/images`
pub async fn images(_ctx: Context) -> Json<Value> {
    Json(json!({
        "name": "images",
        "properties": {
            "images": {"type": "array", "items": image_schema()},
            "schema": {"type": "string"},
            "first": {"type": "string"},
            "next": {"type": "string"}
        },
        "links": [
            {"href": "{first}", "rel": "first"},
            {"href": "{next}", "rel": "next"},
            {"href": "{schema}", "rel": "describedby"}
        ]
    }))
}

/// `GET /v2/schemas/member`
pub async fn member(_ctx: Context) -> Json<Value> {
    Json(member_schema())
}

/// `GET /v2/schemas/members`
pub async fn members(_ctx: Context) -> Json<Value> {
    Json(json!({
        "name": "members",
        "properties": {
            "members": {"type": "array", "items": member_schema()},
            "schema": {"type": "string"}
        },
        "links": [{"href": "{schema}", "rel": "describedby"}]
    }))
}
