//! Who may see and change what: Glance's default policy (2023 "secure RBAC" defaults).
//!
//! - Admins see and change every image.
//! - A project sees its own images, public and community images, and shared images it is a
//!   member of (listings show only the ones it accepted).
//! - Owners with the `member` role change their images; `reader` reads only.
//! - Only admins make an image public; owners may make it community or shared.
//! - Only the member project answers a share (accept/reject); only the owner adds or removes
//!   members.
//!
//! An image the caller may not see is reported as missing (404), never as forbidden, so a
//! request never reveals that an image exists.

use crate::auth::Context;
use crate::error::{RegistryError, Result};
use crate::model::{ImageRecord, MemberRecord, Status, Visibility};

/// Whether `ctx` may see `img`; `member` is `ctx`'s member record for it, if any.
pub fn can_see(ctx: &Context, img: &ImageRecord, member: Option<&MemberRecord>) -> bool {
    if img.status == Status::Deleted {
        return false;
    }
    if img.status == Status::PendingDelete {
        // The recycle bin is the owner's (and the admins') business only.
        return ctx.is_admin() || img.owner == ctx.project_id;
    }
    if ctx.is_admin() || img.owner == ctx.project_id {
        return true;
    }
    match img.visibility {
        Visibility::Public | Visibility::Community => true,
        Visibility::Shared => member.is_some(),
        Visibility::Private => false,
    }
}

/// The 404 for an image the caller may not see.
pub fn not_found(id: &str) -> RegistryError {
    RegistryError::NotFound(format!("No image found with ID {id}"))
}

/// Whether `ctx` may change `img` (metadata, data, tags, members, status, deletion).
pub fn check_modify(ctx: &Context, img: &ImageRecord) -> Result<()> {
    if ctx.is_admin() || (img.owner == ctx.project_id && ctx.can_write()) {
        Ok(())
    } else {
        Err(RegistryError::Forbidden(format!(
            "You are not authorized to modify image {}",
            img.id
        )))
    }
}

/// Whether `ctx` may create images.
pub fn check_create(ctx: &Context) -> Result<()> {
    if ctx.can_write() {
        Ok(())
    } else {
        Err(RegistryError::Forbidden(
            "You are not authorized to create images".into(),
        ))
    }
}

/// Whether `ctx` may give an image visibility `v`.
pub fn check_visibility(ctx: &Context, v: Visibility) -> Result<()> {
    if v == Visibility::Public && !ctx.is_admin() {
        return Err(RegistryError::Forbidden(
            "You are not authorized to set image visibility to public".into(),
        ));
    }
    Ok(())
}

/// Whether `ctx` may set an image's owner to `owner`.
pub fn check_owner(ctx: &Context, owner: &str) -> Result<()> {
    if owner != ctx.project_id && !ctx.is_admin() {
        return Err(RegistryError::Forbidden(
            "You are not permitted to set the image owner to another project".into(),
        ));
    }
    Ok(())
}

/// Whether `ctx` may download `img` in its current status.
pub fn check_download(ctx: &Context, img: &ImageRecord) -> Result<()> {
    if img.status == Status::Deactivated && !ctx.is_admin() {
        return Err(RegistryError::Forbidden(
            "The requested image has been deactivated. Image data download is forbidden.".into(),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{MemberStatus, Role};

    fn ctx(project: &str, role: Role) -> Context {
        Context::for_tests(project, role)
    }

    fn img(owner: &str, v: Visibility) -> ImageRecord {
        let mut i = ImageRecord::new("i".into(), owner.into(), "t".into());
        i.visibility = v;
        i
    }

    #[test]
    fn private_images_are_invisible_to_other_projects_but_not_to_admins() {
        let i = img("a", Visibility::Private);
        assert!(!can_see(&ctx("b", Role::Member), &i, None));
        assert!(can_see(&ctx("b", Role::Admin), &i, None));
        assert!(can_see(&ctx("a", Role::Reader), &i, None));
    }

    #[test]
    fn shared_images_are_visible_to_members_only() {
        let i = img("a", Visibility::Shared);
        let m = MemberRecord {
            image_id: "i".into(),
            member_id: "b".into(),
            status: MemberStatus::Pending,
            created_at: "t".into(),
            updated_at: "t".into(),
        };
        assert!(can_see(&ctx("b", Role::Reader), &i, Some(&m)));
        assert!(!can_see(&ctx("c", Role::Reader), &i, None));
    }

    #[test]
    fn readers_and_strangers_cannot_modify_and_only_admins_publicise() {
        let i = img("a", Visibility::Public);
        assert!(check_modify(&ctx("a", Role::Reader), &i).is_err());
        assert!(check_modify(&ctx("b", Role::Member), &i).is_err());
        assert!(check_modify(&ctx("a", Role::Member), &i).is_ok());
        assert!(check_visibility(&ctx("a", Role::Member), Visibility::Public).is_err());
        assert!(check_visibility(&ctx("a", Role::Member), Visibility::Community).is_ok());
        assert!(check_visibility(&ctx("a", Role::Admin), Visibility::Public).is_ok());
    }

    #[test]
    fn deleted_images_are_invisible_even_to_admins() {
        let mut i = img("a", Visibility::Public);
        i.status = Status::Deleted;
        assert!(!can_see(&ctx("a", Role::Admin), &i, None));
    }
}
