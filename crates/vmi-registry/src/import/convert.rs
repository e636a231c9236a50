//! Converting stored image data with vmi's copy engine.
//!
//! The source is read in place through the store's random access (the engine reads only the
//! ranges the source's mapping says hold data). The target is built in a temporary folder on
//! local disk, because qcow2, VHDX and VDI writers update metadata at random offsets; the folder
//! is removed on every path (success, error, or a cancelled request) when its guard drops. The
//! result is then streamed into the store while its digests are computed. Disk use is bounded
//! by the target's size, which is checked against `image_size_cap` before anything is written.

use super::store_stream;
use crate::api::images::expected_format;
use crate::digest::DigestValues;
use crate::error::{RegistryError, Result};
use crate::server::App;
use futures_util::StreamExt;
use std::path::{Path, PathBuf};
use tokio_util::io::ReaderStream;
use vmi_disk::gate::Gate;
use vmi_disk::{CreateOptions, Format, FormatOptions, Image};

/// Read size when storing a converted file.
const READ_BYTES: usize = 1 << 20;

/// A converted copy, stored.
#[derive(Debug, Clone)]
pub struct Converted {
    /// Where it is stored.
    pub location: String,
    /// Its digests and length.
    pub digests: DigestValues,
    /// The guest size.
    pub virtual_size: u64,
}

/// The creation options vmi uses for each Glance disk format it converts to: VMDK as
/// streamOptimized (what clouds import), VHD as fixed (what Azure requires).
pub(crate) fn create_options(glance_format: &str) -> Result<FormatOptions> {
    let mut o = FormatOptions::new();
    let s = match glance_format {
        "vmdk" => "subformat=streamOptimized",
        "vhd" => "subformat=fixed,force_size=on",
        _ => "",
    };
    if !s.is_empty() {
        o.parse(s)
            .map_err(|e| RegistryError::Config(format!("conversion options {s}: {e}")))?;
    }
    Ok(o)
}

/// 413 when a conversion would write `virtual_size` bytes of guest data, more than `cap` (the
/// image size cap): a small qcow2 can declare a guest of any size.
pub fn check_virtual_size(virtual_size: u64, cap: u64) -> Result<()> {
    if virtual_size > cap {
        return Err(RegistryError::PayloadTooLarge(format!(
            "Converting this image would produce {virtual_size} bytes of guest data (its \
             virtual size), more than the image size cap of {cap} bytes"
        )));
    }
    Ok(())
}

/// Glance disk formats a download may ask for.
pub const DOWNLOAD_FORMATS: [&str; 6] = ["raw", "qcow2", "vmdk", "vhd", "vhdx", "vdi"];

fn work_dir(app: &App) -> PathBuf {
    app.config
        .import
        .work_dir
        .clone()
        .unwrap_or_else(std::env::temp_dir)
}

/// Convert the stored object `src` (`src_size` bytes of `from`) into Glance format `to`, store
/// the result (in `area`, or as image data) and return where and what it is.
pub async fn convert_stored(
    app: &App,
    image_id: &str,
    area: Option<&str>,
    src: &str,
    src_size: u64,
    from: Format,
    to: &str,
) -> Result<Converted> {
    let target = expected_format(to)
        .ok_or_else(|| RegistryError::BadRequest(format!("cannot convert to '{to}'")))?;
    let options = create_options(to)?;
    let dir = work_dir(app);
    std::fs::create_dir_all(&dir)
        .map_err(|e| RegistryError::io(format!("creating {}", dir.display()), e))?;
    let tmp = tempfile::Builder::new()
        .prefix(".vmi-convert-")
        .tempdir_in(&dir)
        .map_err(|e| RegistryError::io("creating a conversion folder", e))?;
    let out = tmp.path().join(format!("image.{to}"));
    let cap = app.config.image_size_cap;
    let data = app.data.clone();
    let (loc, id, out2) = (src.to_string(), image_id.to_string(), out.clone());
    let virtual_size = tokio::task::spawn_blocking(move || -> Result<u64> {
        let storage = data.random_access(&loc, src_size)?;
        let name = PathBuf::from(&id);
        let refused = |e: vmi_disk::Error| RegistryError::BadRequest(format!("conversion: {e}"));
        let img = Image::from_storage(storage, &name, Some(from), false, &Gate::deny_all())
            .map_err(refused)?;
        let vs = img.virtual_size();
        // Fully allocated targets (raw, fixed VHD) hold the whole guest; the others at most
        // the guest plus metadata, which the cap also bounds.
        check_virtual_size(vs, cap)?;
        let dst = Image::create(&out2, target, &CreateOptions::new(vs).options(options))
            .map_err(|e| RegistryError::store("creating the conversion target", e))?;
        vmi_convert::convert(&img, &dst, &vmi_convert::ConvertOptions::default())
            .map_err(|e| RegistryError::store("converting", e))?;
        dst.close()
            .map_err(|e| RegistryError::store("finishing the conversion", e))?;
        Ok(vs)
    })
    .await
    .map_err(|e| RegistryError::store("converting", e))??;
    let (location, digests) = store_file(app, image_id, area, &out, cap).await?;
    drop(tmp);
    Ok(Converted {
        location,
        digests,
        virtual_size,
    })
}

/// Stream a local file into the store.
async fn store_file(
    app: &App,
    image_id: &str,
    area: Option<&str>,
    path: &Path,
    cap: u64,
) -> Result<(String, DigestValues)> {
    let f = tokio::fs::File::open(path)
        .await
        .map_err(|e| RegistryError::io("opening the converted image", e))?;
    let stream = ReaderStream::with_capacity(f, READ_BYTES)
        .map(|r| r.map_err(|e| RegistryError::io("reading the converted image", e)));
    store_stream(app, image_id, area, stream, cap).await
}
