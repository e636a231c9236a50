//! Entry points for the registry's fuzz targets: the parsers of request input that runs before
//! any authorisation beyond a token — the `GET /v2/images` query string (filters, sort keys and
//! directions, limit) down to the SQL it becomes, and the JSON patch of `PATCH /v2/images/{id}`
//! (Glance's `openstack-images-v2.1-json-patch`, RFC 6902 subset). Errors are expected; panics
//! and broken invariants are the bugs these look for.

use crate::api::images::{apply_patch, image_json, parse_list_query};
use crate::auth::Context;
use crate::catalog::sql::list_sql;
use crate::catalog::Viewer;
use crate::model::{ImageRecord, Role, TokenKind};

/// Parse `data` as a URL query string the way `GET /v2/images` does, for an admin and for a
/// project member, and build the listing SQL; its `?` placeholders must match its parameters.
/// Returns how many of the two built SQL.
pub fn list_query(data: &[u8]) -> usize {
    let params = query_pairs(data);
    let mut built = 0;
    for viewer in [Viewer::Admin, Viewer::Project("p1".into())] {
        let Ok((mut q, marker)) = parse_list_query(&params, viewer) else {
            continue;
        };
        if let Some(id) = marker {
            // The handler loads the marker image; any visible record will do here.
            q.marker = Some(ImageRecord::new(
                id,
                "p1".into(),
                "2024-01-01T00:00:00Z".into(),
            ));
        }
        if let Ok((sql, values)) = list_sql(&q) {
            let marks = sql.matches('?').count();
            assert_eq!(
                marks,
                values.len(),
                "placeholders and parameters differ: {sql}"
            );
            built += 1;
        }
    }
    built
}

/// Apply `data` as a JSON patch to a queued image, as its owner (a member) and as an admin; a
/// patched image must still serialise. Returns how many of the two applied it.
pub fn json_patch(data: &[u8]) -> usize {
    let mut applied = 0;
    for roles in [vec![Role::Reader, Role::Member], vec![Role::Admin]] {
        let ctx = Context {
            user_id: "u1".into(),
            user_name: "user".into(),
            project_id: "p1".into(),
            project_name: "project".into(),
            roles,
            kind: TokenKind::Session,
            expires_at: None,
            issued_at: "2024-01-01T00:00:00Z".into(),
        };
        let mut img = ImageRecord::new(
            "00000000-0000-4000-8000-000000000001".into(),
            "p1".into(),
            "2024-01-01T00:00:00Z".into(),
        );
        img.properties.insert("existing".into(), "value".into());
        if apply_patch(&ctx, &mut img, data).is_ok() {
            let v = image_json(&img);
            assert_eq!(v["id"], img.id.as_str(), "a patched image lost its id");
            applied += 1;
        }
    }
    applied
}

/// `application/x-www-form-urlencoded` pairs (`+` is a space, `%XX` a byte, invalid UTF-8 replaced).
fn query_pairs(data: &[u8]) -> Vec<(String, String)> {
    data.split(|&b| b == b'&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let mut kv = p.splitn(2, |&b| b == b'=');
            let k = kv.next().unwrap_or_default();
            let v = kv.next().unwrap_or_default();
            (decode(k), decode(v))
        })
        .collect()
}

fn decode(s: &[u8]) -> String {
    let mut out = Vec::with_capacity(s.len());
    let mut i = 0;
    while i < s.len() {
        match s[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < s.len() && hex(s[i + 1]).is_some() && hex(s[i + 2]).is_some() => {
                out.push(hex(s[i + 1]).unwrap_or(0) << 4 | hex(s[i + 2]).unwrap_or(0));
                i += 2;
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn hex(b: u8) -> Option<u8> {
    (b as char).to_digit(16).and_then(|d| u8::try_from(d).ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_query_string_decodes_like_a_form() {
        let p = query_pairs(b"name=a+b&sort=name%3Aasc&tag&x=%zz%4");
        assert_eq!(
            p,
            vec![
                ("name".into(), "a b".into()),
                ("sort".into(), "name:asc".into()),
                ("tag".into(), String::new()),
                ("x".into(), "%zz%4".into()),
            ]
        );
    }

    #[test]
    fn listing_queries_build_sql_with_one_parameter_per_placeholder() {
        assert_eq!(
            list_query(b"sort=name:asc,size:desc&marker=abc&tag=t&os_hidden=true&k=v"),
            2
        );
        assert_eq!(
            list_query(b"id=in:a,b,c&created_at=gte:2024-01-01T00:00:00Z&visibility=shared"),
            2
        );
        assert_eq!(
            list_query(b"sort_key=name&sort_key=size&sort_dir=asc&member_status=all&size_min=1"),
            2
        );
        assert_eq!(list_query(b"sort=name:sideways"), 0);
    }

    #[test]
    fn a_patch_applies_for_the_owner_and_an_admin_and_a_bad_one_for_neither() {
        let ok = br#"[{"op":"replace","path":"/name","value":"n"},
            {"op":"add","path":"/a~1b","value":"v"},{"op":"remove","path":"/existing"}]"#;
        assert_eq!(json_patch(ok), 2);
        assert_eq!(json_patch(br#"[{"op":"add","path":"/id","value":"x"}]"#), 0);
        assert_eq!(json_patch(b"{"), 0);
    }
}
