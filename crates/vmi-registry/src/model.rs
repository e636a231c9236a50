//! The registry's records: images, members and identity, as the catalog stores them.
//!
//! Field names and allowed values follow the Glance Image API v2 (image and member schemas) and
//! Keystone v3 (projects, users, roles). Timestamps are UTC strings in Glance's
//! `YYYY-MM-DDTHH:MM:SSZ` form, which sort as text.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

/// Disk formats Glance accepts by default (`disk_formats` in glance-api.conf).
pub const DISK_FORMATS: [&str; 11] = [
    "ami", "ari", "aki", "vhd", "vhdx", "vmdk", "raw", "qcow2", "vdi", "iso", "ploop",
];

/// Container formats Glance accepts by default (`container_formats` in glance-api.conf).
pub const CONTAINER_FORMATS: [&str; 8] = [
    "ami",
    "ari",
    "aki",
    "bare",
    "ovf",
    "ova",
    "docker",
    "compressed",
];

/// Glance's `image_property_quota` default: custom properties per image.
pub const MAX_PROPERTIES: usize = 128;
/// Glance's `image_tag_quota` default: tags per image.
pub const MAX_TAGS: usize = 128;
/// Glance's `image_member_quota` default: members per image.
pub const MAX_MEMBERS: usize = 128;
/// Glance's column width for names, tags, property keys and formats.
pub const MAX_NAME_LEN: usize = 255;
/// Glance's column width for property values (TEXT, but bounded here).
pub const MAX_PROPERTY_VALUE_LEN: usize = 65_535;

/// An image's life-cycle state (Glance's image statuses).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Status {
    /// Created; no data yet.
    Queued,
    /// Data is being uploaded.
    Saving,
    /// Data uploaded and verified; downloadable.
    Active,
    /// An upload failed unrecoverably.
    Killed,
    /// Deleted (kept as a tombstone; invisible).
    Deleted,
    /// Downloads blocked for non-admins.
    Deactivated,
    /// Deleted into the recycle bin: data kept until the retention ends (restorable).
    PendingDelete,
    /// Data is being staged for an interoperable import (`PUT …/stage`).
    Uploading,
    /// An import task is moving staged or downloaded data into the store.
    Importing,
}

impl Status {
    /// Glance's name for the status.
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Queued => "queued",
            Status::Saving => "saving",
            Status::Active => "active",
            Status::Killed => "killed",
            Status::Deleted => "deleted",
            Status::Deactivated => "deactivated",
            Status::PendingDelete => "pending_delete",
            Status::Uploading => "uploading",
            Status::Importing => "importing",
        }
    }

    /// Every status, for schemas.
    pub const ALL: [Status; 9] = [
        Status::Queued,
        Status::Saving,
        Status::Active,
        Status::Killed,
        Status::Deleted,
        Status::Deactivated,
        Status::PendingDelete,
        Status::Uploading,
        Status::Importing,
    ];
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Status {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Status::ALL
            .into_iter()
            .find(|v| v.as_str() == s)
            .ok_or_else(|| format!("invalid status '{s}'"))
    }
}

/// Who may see an image (Glance's `visibility`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Visibility {
    /// The owner only.
    Private,
    /// The owner and accepted members.
    Shared,
    /// Everyone, but not listed by default.
    Community,
    /// Everyone.
    Public,
}

impl Visibility {
    /// Glance's name for the visibility.
    pub fn as_str(self) -> &'static str {
        match self {
            Visibility::Private => "private",
            Visibility::Shared => "shared",
            Visibility::Community => "community",
            Visibility::Public => "public",
        }
    }

    /// Every visibility, for schemas.
    pub const ALL: [Visibility; 4] = [
        Visibility::Private,
        Visibility::Shared,
        Visibility::Community,
        Visibility::Public,
    ];
}

impl fmt::Display for Visibility {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Visibility {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Visibility::ALL
            .into_iter()
            .find(|v| v.as_str() == s)
            .ok_or_else(|| format!("invalid visibility '{s}'"))
    }
}

/// One image, as the catalog stores it.
#[derive(Debug, Clone, PartialEq)]
pub struct ImageRecord {
    /// UUID.
    pub id: String,
    /// Display name.
    pub name: Option<String>,
    /// Life-cycle state.
    pub status: Status,
    /// Who may see it.
    pub visibility: Visibility,
    /// Owning project id.
    pub owner: String,
    /// One of [`DISK_FORMATS`].
    pub disk_format: Option<String>,
    /// One of [`CONTAINER_FORMATS`].
    pub container_format: Option<String>,
    /// Bytes stored.
    pub size: Option<u64>,
    /// Guest-visible size found by inspection.
    pub virtual_size: Option<u64>,
    /// MD5 of the data, hex (Glance's legacy `checksum`).
    pub checksum: Option<String>,
    /// Name of the multihash algorithm (`sha512`).
    pub os_hash_algo: Option<String>,
    /// The multihash, hex.
    pub os_hash_value: Option<String>,
    /// SHA-256 of the data, hex (kept for the chunk layout and OCI-style clients).
    pub sha256: Option<String>,
    /// Minimum disk, GiB.
    pub min_disk: u64,
    /// Minimum RAM, MiB.
    pub min_ram: u64,
    /// Deletion is refused while set.
    pub protected: bool,
    /// Hidden from default listings.
    pub os_hidden: bool,
    /// Where the data lives in the image store (never shown to clients).
    pub location: Option<String>,
    /// Creation time.
    pub created_at: String,
    /// Last change.
    pub updated_at: String,
    /// Bumped by the catalog at every stored change; a write names the revision it read, so it
    /// cannot overwrite a change it has not seen (never shown to clients).
    pub revision: u64,
    /// Tags, sorted and unique.
    pub tags: Vec<String>,
    /// Custom properties.
    pub properties: BTreeMap<String, String>,
}

impl ImageRecord {
    /// A new queued image owned by `owner`.
    pub fn new(id: String, owner: String, now: String) -> Self {
        ImageRecord {
            id,
            name: None,
            status: Status::Queued,
            visibility: Visibility::Shared,
            owner,
            disk_format: None,
            container_format: None,
            size: None,
            virtual_size: None,
            checksum: None,
            os_hash_algo: None,
            os_hash_value: None,
            sha256: None,
            min_disk: 0,
            min_ram: 0,
            protected: false,
            os_hidden: false,
            location: None,
            created_at: now.clone(),
            updated_at: now,
            revision: 0,
            tags: Vec::new(),
            properties: BTreeMap::new(),
        }
    }

    /// Replay onto `self` (the image as stored now) the changes that turned `base` into `ours`:
    /// every field, tag and property `ours` changed relative to `base` takes `ours`' value; what
    /// it left alone keeps `self`'s, so a change stored by another request since `base` was read
    /// survives. The revision stays `self`'s.
    pub fn replay(&mut self, base: &ImageRecord, ours: &ImageRecord) {
        macro_rules! take {
            ($($f:ident),*) => {
                $(if ours.$f != base.$f {
                    self.$f = ours.$f.clone();
                })*
            };
        }
        take!(
            name,
            status,
            visibility,
            owner,
            disk_format,
            container_format,
            size,
            virtual_size,
            checksum,
            os_hash_algo,
            os_hash_value,
            sha256,
            min_disk,
            min_ram,
            protected,
            os_hidden,
            location,
            updated_at
        );
        for t in ours.tags.iter().filter(|t| !base.tags.contains(t)) {
            if !self.tags.contains(t) {
                self.tags.push(t.clone());
            }
        }
        self.tags
            .retain(|t| ours.tags.contains(t) || !base.tags.contains(t));
        self.tags.sort();
        for (k, v) in &ours.properties {
            if base.properties.get(k) != Some(v) {
                self.properties.insert(k.clone(), v.clone());
            }
        }
        for k in base.properties.keys() {
            if !ours.properties.contains_key(k) {
                self.properties.remove(k);
            }
        }
    }
}

/// A member's answer to a share.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MemberStatus {
    /// Not yet answered.
    Pending,
    /// Accepted: the image is listed for the member.
    Accepted,
    /// Rejected: the image is hidden from the member's list.
    Rejected,
}

impl MemberStatus {
    /// Glance's name.
    pub fn as_str(self) -> &'static str {
        match self {
            MemberStatus::Pending => "pending",
            MemberStatus::Accepted => "accepted",
            MemberStatus::Rejected => "rejected",
        }
    }
}

impl FromStr for MemberStatus {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "pending" => Ok(MemberStatus::Pending),
            "accepted" => Ok(MemberStatus::Accepted),
            "rejected" => Ok(MemberStatus::Rejected),
            _ => Err(format!("invalid member status '{s}'")),
        }
    }
}

/// A project an image is shared with.
#[derive(Debug, Clone, PartialEq)]
pub struct MemberRecord {
    /// The image.
    pub image_id: String,
    /// The member project.
    pub member_id: String,
    /// The member's answer.
    pub status: MemberStatus,
    /// When shared.
    pub created_at: String,
    /// When last answered.
    pub updated_at: String,
}

/// A Keystone role. Each implies the ones below it (admin ⊃ member ⊃ reader).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Role {
    /// Read only.
    Reader,
    /// Read and write the project's images.
    Member,
    /// Everything, in every project.
    Admin,
}

impl Role {
    /// Keystone's role name (also its id here).
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Reader => "reader",
            Role::Member => "member",
            Role::Admin => "admin",
        }
    }

    /// Every role.
    pub const ALL: [Role; 3] = [Role::Admin, Role::Member, Role::Reader];
}

impl FromStr for Role {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "reader" => Ok(Role::Reader),
            "member" | "_member_" => Ok(Role::Member),
            "admin" => Ok(Role::Admin),
            _ => Err(format!("unknown role '{s}'")),
        }
    }
}

/// A project (tenant): owns images.
#[derive(Debug, Clone, PartialEq)]
pub struct Project {
    /// Id (hex UUID).
    pub id: String,
    /// Unique name.
    pub name: String,
}

/// A user who authenticates with a password or a token.
#[derive(Debug, Clone, PartialEq)]
pub struct User {
    /// Id (hex UUID).
    pub id: String,
    /// Unique name.
    pub name: String,
    /// Argon2 PHC string; `None` for token-only users.
    pub password_hash: Option<String>,
    /// Project used when a token request names no scope.
    pub default_project_id: Option<String>,
    /// Disabled users cannot authenticate.
    pub enabled: bool,
}

/// How a token was issued.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenKind {
    /// Issued by `POST /v3/auth/tokens`; expires.
    Session,
    /// A static API token for scripts; does not expire.
    Api,
}

impl TokenKind {
    /// Stored name.
    pub fn as_str(self) -> &'static str {
        match self {
            TokenKind::Session => "session",
            TokenKind::Api => "api",
        }
    }
}

/// A token as stored: only its SHA-256 is kept, never the token itself.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenRecord {
    /// Hex SHA-256 of the token string.
    pub token_hash: String,
    /// The user it authenticates.
    pub user_id: String,
    /// The project it is scoped to.
    pub project_id: String,
    /// Session or API token.
    pub kind: TokenKind,
    /// When issued.
    pub issued_at: String,
    /// When it stops working; `None` for API tokens.
    pub expires_at: Option<String>,
}

/// The current time in Glance's format.
pub fn now() -> String {
    chrono::Utc::now().format("%Y-%m-%dT%H:%M:%SZ").to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image() -> ImageRecord {
        let mut i = ImageRecord::new("id".into(), "p".into(), "t0".into());
        i.tags = vec!["a".into(), "b".into()];
        i.properties.insert("keep".into(), "1".into());
        i.properties.insert("gone".into(), "1".into());
        i
    }

    #[test]
    fn replay_applies_only_what_the_request_changed() {
        let base = image();
        let mut ours = base.clone();
        ours.name = Some("mine".into());
        ours.tags = vec!["a".into(), "c".into()];
        ours.properties.remove("gone");
        ours.properties.insert("added".into(), "x".into());
        // Meanwhile another request changed other things, and one the same field.
        let mut current = base.clone();
        current.revision = 7;
        current.min_ram = 1024;
        current.name = Some("theirs".into());
        current.tags.push("d".into());
        current
            .properties
            .insert("lifecycle".into(), "deprecated".into());
        current.properties.insert("keep".into(), "2".into());
        current.replay(&base, &ours);
        assert_eq!(current.revision, 7);
        assert_eq!(current.min_ram, 1024);
        assert_eq!(current.name.as_deref(), Some("mine"));
        assert_eq!(current.tags, ["a", "c", "d"]);
        assert_eq!(
            current.properties.get("keep").map(String::as_str),
            Some("2")
        );
        assert_eq!(
            current.properties.get("added").map(String::as_str),
            Some("x")
        );
        assert_eq!(
            current.properties.get("lifecycle").map(String::as_str),
            Some("deprecated")
        );
        assert!(!current.properties.contains_key("gone"));
    }
}
