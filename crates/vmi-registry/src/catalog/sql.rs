//! SQL shared by the catalog backends: the image column list, the values of an image row, and
//! the listing query (filters, visibility rules, sorting and keyset pagination). It uses only
//! SQL that SQLite and PostgreSQL both accept; placeholders are `?` (PostgreSQL's backend
//! numbers them).

use super::{Cmp, Field, Filter, ImageQuery, MemberFilter, SortKey, Viewer};
use crate::error::{RegistryError, Result};
use crate::model::{ImageRecord, Visibility};

/// A parameter value, typed so that a NULL keeps its column type.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum SqlValue {
    /// An integer or NULL.
    Int(Option<i64>),
    /// Text or NULL.
    Text(Option<String>),
}

/// Columns of `images` that [`image_values`] writes (after the id), in the order the backends'
/// `image_from_row` reads them; [`IMAGE_SELECT`] adds the revision.
pub(crate) const IMAGE_COLS: &str =
    "i.id, i.name, i.status, i.visibility, i.owner, i.disk_format, \
    i.container_format, i.size, i.virtual_size, i.checksum, i.os_hash_algo, i.os_hash_value, \
    i.sha256, i.min_disk, i.min_ram, i.protected, i.os_hidden, i.location, i.created_at, \
    i.updated_at";

/// The columns a query reads to build an [`ImageRecord`]: [`IMAGE_COLS`] and the revision.
pub(crate) const IMAGE_SELECT: &str = concat!(
    "i.id, i.name, i.status, i.visibility, i.owner, i.disk_format, \
    i.container_format, i.size, i.virtual_size, i.checksum, i.os_hash_algo, i.os_hash_value, \
    i.sha256, i.min_disk, i.min_ram, i.protected, i.os_hidden, i.location, i.created_at, \
    i.updated_at",
    ", i.revision"
);

/// `SET` clauses of an image update (every column of [`IMAGE_COLS`] but the id, with `?`
/// placeholders in [`image_values`] order) that also bump the revision.
pub(crate) fn update_sets() -> String {
    let mut sets: Vec<String> = IMAGE_COLS
        .replace("i.", "")
        .split(", ")
        .skip(1)
        .map(|c| format!("{} = ?", c.trim()))
        .collect();
    sets.push("revision = revision + 1".into());
    sets.join(", ")
}

pub(crate) fn int(v: u64, what: &'static str) -> Result<i64> {
    i64::try_from(v).map_err(|_| RegistryError::BadRequest(format!("{what} {v} is too large")))
}

/// Values of the mutable columns, in `UPDATE`/`INSERT` order after the id.
pub(crate) fn image_values(img: &ImageRecord) -> Result<Vec<SqlValue>> {
    let opt_int = |v: Option<u64>, what| -> Result<SqlValue> {
        Ok(match v {
            Some(v) => SqlValue::Int(Some(int(v, what)?)),
            None => SqlValue::Int(None),
        })
    };
    let text = |v: &Option<String>| SqlValue::Text(v.clone());
    Ok(vec![
        text(&img.name),
        SqlValue::Text(Some(img.status.as_str().into())),
        SqlValue::Text(Some(img.visibility.as_str().into())),
        SqlValue::Text(Some(img.owner.clone())),
        text(&img.disk_format),
        text(&img.container_format),
        opt_int(img.size, "size")?,
        opt_int(img.virtual_size, "virtual_size")?,
        text(&img.checksum),
        text(&img.os_hash_algo),
        text(&img.os_hash_value),
        text(&img.sha256),
        SqlValue::Int(Some(int(img.min_disk, "min_disk")?)),
        SqlValue::Int(Some(int(img.min_ram, "min_ram")?)),
        SqlValue::Int(Some(i64::from(img.protected))),
        SqlValue::Int(Some(i64::from(img.os_hidden))),
        text(&img.location),
        SqlValue::Text(Some(img.created_at.clone())),
        SqlValue::Text(Some(img.updated_at.clone())),
    ])
}

pub(crate) fn sort_expr(k: SortKey) -> &'static str {
    match k {
        SortKey::Name => "COALESCE(i.name, '')",
        SortKey::Status => "i.status",
        SortKey::ContainerFormat => "COALESCE(i.container_format, '')",
        SortKey::DiskFormat => "COALESCE(i.disk_format, '')",
        SortKey::Size => "COALESCE(i.size, -1)",
        SortKey::Id => "i.id",
        SortKey::CreatedAt => "i.created_at",
        SortKey::UpdatedAt => "i.updated_at",
        SortKey::Visibility => "i.visibility",
        SortKey::Owner => "i.owner",
        SortKey::MinDisk => "i.min_disk",
        SortKey::MinRam => "i.min_ram",
    }
}

pub(crate) fn sort_value(k: SortKey, m: &ImageRecord) -> SqlValue {
    let num = |v: u64| SqlValue::Int(Some(i64::try_from(v).unwrap_or(i64::MAX)));
    match k {
        SortKey::Name => SqlValue::Text(Some(m.name.clone().unwrap_or_default())),
        SortKey::Status => SqlValue::Text(Some(m.status.as_str().into())),
        SortKey::ContainerFormat => {
            SqlValue::Text(Some(m.container_format.clone().unwrap_or_default()))
        }
        SortKey::DiskFormat => SqlValue::Text(Some(m.disk_format.clone().unwrap_or_default())),
        SortKey::Size => m.size.map(num).unwrap_or(SqlValue::Int(Some(-1))),
        SortKey::Id => SqlValue::Text(Some(m.id.clone())),
        SortKey::CreatedAt => SqlValue::Text(Some(m.created_at.clone())),
        SortKey::UpdatedAt => SqlValue::Text(Some(m.updated_at.clone())),
        SortKey::Visibility => SqlValue::Text(Some(m.visibility.as_str().into())),
        SortKey::Owner => SqlValue::Text(Some(m.owner.clone())),
        SortKey::MinDisk => num(m.min_disk),
        SortKey::MinRam => num(m.min_ram),
    }
}

pub(crate) fn field_expr(f: Field) -> &'static str {
    match f {
        Field::Id => "i.id",
        Field::Name => "i.name",
        Field::Status => "i.status",
        Field::Owner => "i.owner",
        Field::DiskFormat => "i.disk_format",
        Field::ContainerFormat => "i.container_format",
        Field::Size => "i.size",
        Field::CreatedAt => "i.created_at",
        Field::UpdatedAt => "i.updated_at",
        Field::Protected => "i.protected",
    }
}

pub(crate) fn filter_value(f: &Filter, v: &str) -> Result<SqlValue> {
    match f.field {
        Field::Size => v
            .parse::<i64>()
            .map(|n| SqlValue::Int(Some(n)))
            .map_err(|_| RegistryError::BadRequest(format!("invalid size filter '{v}'"))),
        Field::Protected => match v {
            "true" => Ok(SqlValue::Int(Some(1))),
            "false" => Ok(SqlValue::Int(Some(0))),
            _ => Err(RegistryError::BadRequest(format!(
                "invalid protected filter '{v}'"
            ))),
        },
        _ => Ok(SqlValue::Text(Some(v.to_string()))),
    }
}

/// Build the listing SQL and its parameters.
pub(crate) fn list_sql(q: &ImageQuery) -> Result<(String, Vec<SqlValue>)> {
    let mut w: Vec<String> = vec!["i.status != 'deleted'".into()];
    let mut p: Vec<SqlValue> = Vec::new();
    match &q.viewer {
        Viewer::Admin => {
            if let Some(v) = q.visibility {
                w.push("i.visibility = ?".into());
                p.push(SqlValue::Text(Some(v.as_str().into())));
            }
        }
        Viewer::Project(project) => {
            let member = |p: &mut Vec<SqlValue>| -> String {
                p.push(SqlValue::Text(Some(project.clone())));
                match q.member_status {
                    MemberFilter::Only(s) => {
                        p.push(SqlValue::Text(Some(s.as_str().into())));
                        "EXISTS (SELECT 1 FROM image_members m WHERE m.image_id = i.id \
                         AND m.member_id = ? AND m.status = ?)"
                            .into()
                    }
                    MemberFilter::All => "EXISTS (SELECT 1 FROM image_members m WHERE \
                         m.image_id = i.id AND m.member_id = ?)"
                        .into(),
                }
            };
            let owner = SqlValue::Text(Some(project.clone()));
            match q.visibility {
                None => {
                    p.push(owner);
                    let m = member(&mut p);
                    let community = if q.all_visibilities {
                        " OR i.visibility = 'community'"
                    } else {
                        ""
                    };
                    w.push(format!(
                        "(i.owner = ? OR i.visibility = 'public' \
                         OR (i.visibility = 'shared' AND {m}){community})"
                    ));
                }
                Some(Visibility::Public) => w.push("i.visibility = 'public'".into()),
                Some(Visibility::Community) => w.push("i.visibility = 'community'".into()),
                Some(Visibility::Shared) => {
                    p.push(owner);
                    let m = member(&mut p);
                    w.push(format!("i.visibility = 'shared' AND (i.owner = ? OR {m})"));
                }
                Some(Visibility::Private) => {
                    w.push("i.visibility = 'private' AND i.owner = ?".into());
                    p.push(owner);
                }
            }
        }
    }
    for f in &q.filters {
        let col = field_expr(f.field);
        match &f.cmp {
            Cmp::In(vals) => {
                if vals.is_empty() {
                    w.push("0".into());
                    continue;
                }
                let marks = vec!["?"; vals.len()].join(", ");
                w.push(format!("{col} IN ({marks})"));
                for v in vals {
                    p.push(filter_value(f, v)?);
                }
            }
            cmp => {
                let op = match cmp {
                    Cmp::Eq => "=",
                    Cmp::Neq => "!=",
                    Cmp::Gt => ">",
                    Cmp::Gte => ">=",
                    Cmp::Lt => "<",
                    _ => "<=",
                };
                w.push(format!("{col} {op} ?"));
                p.push(filter_value(f, &f.value)?);
            }
        }
    }
    for t in &q.tags {
        w.push("EXISTS (SELECT 1 FROM image_tags t WHERE t.image_id = i.id AND t.tag = ?)".into());
        p.push(SqlValue::Text(Some(t.clone())));
    }
    for (k, v) in &q.properties {
        w.push(
            "EXISTS (SELECT 1 FROM image_properties x WHERE x.image_id = i.id \
             AND x.name = ? AND x.value = ?)"
                .into(),
        );
        p.push(SqlValue::Text(Some(k.clone())));
        p.push(SqlValue::Text(Some(v.clone())));
    }
    if let Some(h) = q.os_hidden {
        w.push("i.os_hidden = ?".into());
        p.push(SqlValue::Int(Some(i64::from(h))));
    }
    let mut keys = q.sort.clone();
    if !keys.iter().any(|(k, _)| *k == SortKey::Id) {
        let dir = keys.last().map(|(_, asc)| *asc).unwrap_or(false);
        keys.push((SortKey::Id, dir));
    }
    if let Some(m) = &q.marker {
        // Keyset pagination: rows strictly after the marker in the sort order.
        let mut ors = Vec::new();
        for (i, (k, asc)) in keys.iter().enumerate() {
            let mut ands = Vec::new();
            for (pk, _) in &keys[..i] {
                ands.push(format!("{} = ?", sort_expr(*pk)));
                p.push(sort_value(*pk, m));
            }
            ands.push(format!(
                "{} {} ?",
                sort_expr(*k),
                if *asc { ">" } else { "<" }
            ));
            p.push(sort_value(*k, m));
            ors.push(format!("({})", ands.join(" AND ")));
        }
        w.push(format!("({})", ors.join(" OR ")));
    }
    let order: Vec<String> = keys
        .iter()
        .map(|(k, asc)| format!("{} {}", sort_expr(*k), if *asc { "ASC" } else { "DESC" }))
        .collect();
    p.push(SqlValue::Int(Some(i64::from(q.limit))));
    let sql = format!(
        "SELECT {IMAGE_SELECT} FROM images i WHERE {} ORDER BY {} LIMIT ?",
        w.join(" AND "),
        order.join(", ")
    );
    Ok((sql, p))
}

/// `sql` with its `?` placeholders numbered `$1`, `$2`, … (PostgreSQL).
#[cfg(feature = "postgres")]
pub(crate) fn numbered(sql: &str) -> String {
    let mut out = String::with_capacity(sql.len() + 16);
    let mut n = 0;
    for c in sql.chars() {
        if c == '?' {
            n += 1;
            out.push_str(&format!("${n}"));
        } else {
            out.push(c);
        }
    }
    out
}
