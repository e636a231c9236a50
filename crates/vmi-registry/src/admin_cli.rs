//! `vmi admin`: identity administration against a registry's Keystone-compatible `/v3` API —
//! projects, users and role assignments — for operators who have no `openstack` CLI at hand.
//! Every command needs an admin token or an admin's password login.

use crate::cli::connection;
use crate::client::RegistryClient;
use crate::error::{RegistryError, Result};
use clap::{Args, Subcommand};
use serde_json::{json, Value};
use std::io::{BufRead, Write};

/// `vmi admin`: projects, users, roles.
#[derive(Debug, Clone, Args)]
pub struct AdminArgs {
    /// Registry URL (default: $VMI_REGISTRY_URL, else http://127.0.0.1:9292).
    #[arg(long, global = true, value_name = "URL")]
    pub url: Option<String>,
    /// Token (default: $VMI_TOKEN, else $OS_AUTH_TOKEN).
    #[arg(long, global = true, value_name = "TOKEN")]
    pub token: Option<String>,
    /// User for password authentication (default: $OS_USERNAME); the password is read from
    /// $OS_PASSWORD.
    #[arg(long = "os-user", global = true, value_name = "NAME")]
    pub os_user: Option<String>,
    /// Project to scope a password login to (default: $OS_PROJECT_NAME).
    #[arg(long = "os-project", global = true, value_name = "NAME")]
    pub os_project: Option<String>,
    /// Print JSON instead of text.
    #[arg(long, global = true)]
    pub json: bool,
    /// What to administer.
    #[command(subcommand)]
    pub command: AdminCommand,
}

/// `vmi admin` subcommands.
#[derive(Debug, Clone, Subcommand)]
pub enum AdminCommand {
    /// Projects.
    #[command(subcommand)]
    Project(ProjectCommand),
    /// Users.
    #[command(subcommand)]
    User(UserCommand),
    /// Role assignments (roles: admin, member, reader).
    #[command(subcommand)]
    Role(RoleCommand),
}

/// `vmi admin project …`
#[derive(Debug, Clone, Subcommand)]
pub enum ProjectCommand {
    /// Create a project.
    Create {
        /// Its name.
        name: String,
    },
    /// List projects.
    List,
    /// Show a project (by name or id).
    Show {
        /// Name or id.
        project: String,
    },
}

/// `vmi admin user …`
#[derive(Debug, Clone, Subcommand)]
pub enum UserCommand {
    /// Create a user.
    Create {
        /// Its name.
        name: String,
        /// Its default project (name or id).
        #[arg(long, value_name = "PROJECT")]
        project: Option<String>,
        /// Read the password from the first line of standard input.
        #[arg(long)]
        password_stdin: bool,
        /// The password (visible to other local users in the process list; prefer
        /// --password-stdin).
        #[arg(long, value_name = "PASSWORD", conflicts_with = "password_stdin")]
        password: Option<String>,
    },
    /// List users.
    List,
    /// Show a user (by name or id).
    Show {
        /// Name or id.
        user: String,
    },
}

/// `vmi admin role …`
#[derive(Debug, Clone, Subcommand)]
pub enum RoleCommand {
    /// Give a user a role on a project.
    Add {
        /// The project (name or id).
        #[arg(long, value_name = "PROJECT")]
        project: String,
        /// The user (name or id).
        #[arg(long, value_name = "USER")]
        user: String,
        /// admin, member or reader.
        role: String,
    },
    /// Take a role on a project from a user.
    Remove {
        /// The project (name or id).
        #[arg(long, value_name = "PROJECT")]
        project: String,
        /// The user (name or id).
        #[arg(long, value_name = "USER")]
        user: String,
        /// admin, member or reader.
        role: String,
    },
    /// List role assignments, optionally of one project and/or user.
    List {
        /// Only this project (name or id).
        #[arg(long, value_name = "PROJECT")]
        project: Option<String>,
        /// Only this user (name or id).
        #[arg(long, value_name = "USER")]
        user: Option<String>,
    },
}

/// Run `vmi admin …`, printing to stdout.
pub fn run_admin(args: AdminArgs) -> Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| RegistryError::io("starting the runtime", e))?;
    let vars: Vec<(String, String)> = std::env::vars().collect();
    let stdin = std::io::stdin();
    let mut input = stdin.lock();
    let mut out = std::io::stdout().lock();
    rt.block_on(admin_command(&args, &vars, &mut input, &mut out))
}

fn enc(s: &str) -> String {
    crate::api::images::encode(s)
}

/// Find a project or user by id, else by name (as the openstack CLI does).
async fn find(c: &RegistryClient, kind: &str, key: &str) -> Result<Value> {
    let plural = format!("{kind}s");
    if let Ok(v) = c.get_json(&format!("/v3/{plural}/{}", enc(key))).await {
        if let Some(found) = v.get(kind) {
            return Ok(found.clone());
        }
    }
    let v = c
        .get_json(&format!("/v3/{plural}?name={}", enc(key)))
        .await?;
    let list = v.get(&plural).and_then(Value::as_array);
    match list.map(Vec::as_slice) {
        Some([one]) => Ok(one.clone()),
        _ => Err(RegistryError::NotFound(format!(
            "no {kind} named or with id '{key}'"
        ))),
    }
}

fn id_of(v: &Value) -> String {
    v.get("id")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_string()
}

fn print(out: &mut dyn Write, v: &Value, as_json: bool, text: &[String]) -> Result<()> {
    let s = if as_json {
        serde_json::to_string_pretty(v).unwrap_or_default()
    } else {
        text.join("\n")
    };
    if s.is_empty() {
        return Ok(());
    }
    writeln!(out, "{s}").map_err(|e| RegistryError::io("writing output", e))
}

fn fields(v: &Value, keys: &[&str]) -> Vec<String> {
    keys.iter()
        .map(|k| {
            let s = match v.get(*k) {
                Some(Value::String(s)) => s.clone(),
                None | Some(Value::Null) => String::new(),
                Some(other) => other.to_string(),
            };
            format!("{k:<20} {s}")
        })
        .collect()
}

fn rows(list: &[Value], keys: &[&str]) -> Vec<String> {
    list.iter()
        .map(|v| {
            keys.iter()
                .map(|k| v.get(*k).and_then(Value::as_str).unwrap_or("").to_string())
                .collect::<Vec<_>>()
                .join("  ")
        })
        .collect()
}

/// `vmi admin …` against the environment `vars`, reading a password from `input` when asked,
/// writing to `out`.
pub async fn admin_command(
    args: &AdminArgs,
    vars: &[(String, String)],
    input: &mut dyn BufRead,
    out: &mut dyn Write,
) -> Result<()> {
    let (url, auth) = connection(
        args.url.as_deref(),
        args.token.as_deref(),
        args.os_user.as_deref(),
        args.os_project.as_deref(),
        vars,
    )?;
    let c = RegistryClient::connect(&url, &auth).await?;
    let j = args.json;
    const PROJECT: [&str; 3] = ["id", "name", "domain_id"];
    const USER: [&str; 4] = ["id", "name", "default_project_id", "enabled"];
    match &args.command {
        AdminCommand::Project(ProjectCommand::Create { name }) => {
            let v = c
                .post_json("/v3/projects", &json!({"project": {"name": name}}))
                .await?;
            print(out, &v["project"], j, &fields(&v["project"], &PROJECT))
        }
        AdminCommand::Project(ProjectCommand::List) => {
            let v = c.get_json("/v3/projects").await?;
            let list = v["projects"].as_array().cloned().unwrap_or_default();
            print(out, &v["projects"], j, &rows(&list, &["id", "name"]))
        }
        AdminCommand::Project(ProjectCommand::Show { project }) => {
            let p = find(&c, "project", project).await?;
            print(out, &p, j, &fields(&p, &PROJECT))
        }
        AdminCommand::User(UserCommand::Create {
            name,
            project,
            password_stdin,
            password,
        }) => {
            let mut body = json!({"name": name});
            let pw = if *password_stdin {
                let mut line = String::new();
                input
                    .read_line(&mut line)
                    .map_err(|e| RegistryError::io("reading the password", e))?;
                Some(line.trim_end_matches(['\r', '\n']).to_string())
            } else {
                password.clone()
            };
            if let Some(pw) = pw {
                body["password"] = json!(pw);
            }
            if let Some(p) = project {
                body["default_project_id"] = json!(id_of(&find(&c, "project", p).await?));
            }
            let v = c.post_json("/v3/users", &json!({"user": body})).await?;
            print(out, &v["user"], j, &fields(&v["user"], &USER))
        }
        AdminCommand::User(UserCommand::List) => {
            let v = c.get_json("/v3/users").await?;
            let list = v["users"].as_array().cloned().unwrap_or_default();
            print(out, &v["users"], j, &rows(&list, &["id", "name"]))
        }
        AdminCommand::User(UserCommand::Show { user }) => {
            let u = find(&c, "user", user).await?;
            print(out, &u, j, &fields(&u, &USER))
        }
        AdminCommand::Role(RoleCommand::Add {
            project,
            user,
            role,
        })
        | AdminCommand::Role(RoleCommand::Remove {
            project,
            user,
            role,
        }) => {
            let p = id_of(&find(&c, "project", project).await?);
            let u = id_of(&find(&c, "user", user).await?);
            let method = if matches!(args.command, AdminCommand::Role(RoleCommand::Add { .. })) {
                reqwest::Method::PUT
            } else {
                reqwest::Method::DELETE
            };
            c.send_empty(
                method,
                &format!(
                    "/v3/projects/{}/users/{}/roles/{}",
                    enc(&p),
                    enc(&u),
                    enc(role)
                ),
            )
            .await
        }
        AdminCommand::Role(RoleCommand::List { project, user }) => {
            let mut q = vec!["include_names=true".to_string()];
            if let Some(p) = project {
                q.push(format!(
                    "scope.project.id={}",
                    enc(&id_of(&find(&c, "project", p).await?))
                ));
            }
            if let Some(u) = user {
                q.push(format!(
                    "user.id={}",
                    enc(&id_of(&find(&c, "user", u).await?))
                ));
            }
            let v = c
                .get_json(&format!("/v3/role_assignments?{}", q.join("&")))
                .await?;
            let list = v["role_assignments"]
                .as_array()
                .cloned()
                .unwrap_or_default();
            let text: Vec<String> = list
                .iter()
                .map(|a| {
                    format!(
                        "{}  {}  {}",
                        a.pointer("/scope/project/name")
                            .and_then(Value::as_str)
                            .unwrap_or(""),
                        a.pointer("/user/name")
                            .and_then(Value::as_str)
                            .unwrap_or(""),
                        a.pointer("/role/name")
                            .and_then(Value::as_str)
                            .unwrap_or("")
                    )
                })
                .collect();
            print(out, &v["role_assignments"], j, &text)
        }
    }
}
