//! Image bytes, behind the [`ImageData`] interface.
//!
//! The API layer only ever asks for "a sink for a new upload of image X", "a byte stream of this
//! location (or a range of it)", "random access for inspection" and "delete this location". It
//! never sees object keys' layout, so a deduplicated chunk layout can replace
//! [`WholeObjectData`] without touching the API.
//!
//! [`WholeObjectData`] stores each upload as one object `images/<image-id>/<upload-id>` in an
//! `object_store` (`LocalFileSystem` now; the S3 backend is the same code with another store).
//! An upload is written with a multipart upload, so the object only appears when the upload
//! completes; it becomes visible to clients only once the catalog records its location and
//! digests. Objects that no live image references (a crash between the two steps) are removed
//! by [`ImageData::reap`].

use crate::error::{RegistryError, Result};
use async_trait::async_trait;
use bytes::Bytes;
use futures_util::stream::BoxStream;
use futures_util::{StreamExt, TryStreamExt};
use object_store::path::Path as ObjPath;
use object_store::{GetOptions, GetRange, GetResultPayload, ObjectStore, WriteMultipart};
use std::collections::HashSet;
use std::io::{self, Seek, SeekFrom};
use std::ops::Range;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};
use tokio::io::AsyncReadExt;
use tokio_util::io::ReaderStream;
use vmi_disk::storage::Storage;

/// A stream of image bytes.
pub type ByteStream = BoxStream<'static, io::Result<Bytes>>;

/// Size of each part of a multipart upload (S3's minimum is 5 MiB).
const PART_BYTES: usize = 8 << 20;
/// Read size when streaming a local file to a client.
const READ_BYTES: usize = 1 << 20;
/// Parts written concurrently per upload.
const PART_CONCURRENCY: usize = 4;
/// Prefix of every image object.
const IMAGES_PREFIX: &str = "images";
/// Areas beside the images that [`ImageData::begin_in`] writes to: data staged for an import
/// (`staging/`) and converted copies served to downloads (`cache/`).
pub const AREAS: [&str; 2] = ["staging", "cache"];

/// Where an upload is being written.
#[async_trait]
pub trait UploadSink: Send {
    /// The location the catalog records once the upload is accepted.
    fn location(&self) -> &str;
    /// Append bytes.
    async fn write(&mut self, chunk: Bytes) -> Result<()>;
    /// Complete the upload; the bytes are stored at [`UploadSink::location`].
    async fn finish(self: Box<Self>) -> Result<()>;
    /// Abandon the upload, leaving nothing behind.
    async fn abort(self: Box<Self>);
}

/// The image data store.
#[async_trait]
pub trait ImageData: Send + Sync + 'static {
    /// Start storing a new upload for `image_id`.
    async fn begin(&self, image_id: &str) -> Result<Box<dyn UploadSink>>;
    /// Start storing a new object for `image_id` in one of the [`AREAS`] (staged imports,
    /// converted downloads). Every node reaches it: it lives in the same store as the images.
    async fn begin_in(&self, area: &str, image_id: &str) -> Result<Box<dyn UploadSink>>;
    /// Stream the bytes at `location`, or the half-open `range` of them.
    async fn read(&self, location: &str, range: Option<Range<u64>>) -> Result<ByteStream>;
    /// Random read access to `location` of `size` bytes, for inspection. Its reads block: call
    /// it and use it only on the blocking pool.
    fn random_access(&self, location: &str, size: u64) -> Result<Box<dyn Storage>>;
    /// Delete the bytes at `location` (absent is fine).
    async fn delete(&self, location: &str) -> Result<()>;
    /// Delete stored data that is not in `keep` and is older than `grace`; returns the count.
    /// Upload sessions' chunks are never in `keep`, so abandoned sessions go after `grace`.
    async fn reap(&self, keep: &HashSet<String>, grace: Duration) -> Result<usize>;

    /// Open a resumable upload session `session` for `image_id`.
    async fn session_create(&self, image_id: &str, session: &str) -> Result<()>;
    /// The chunks a session has received, in order and contiguous from offset 0; `None` when
    /// there is no such session.
    async fn session_chunks(&self, image_id: &str, session: &str) -> Result<Option<Vec<Chunk>>>;
    /// A sink for the chunk of `session` that starts at `offset`. The chunk exists only once
    /// the sink finishes, so an interrupted chunk leaves the session as it was.
    async fn session_append(
        &self,
        image_id: &str,
        session: &str,
        offset: u64,
    ) -> Result<Box<dyn UploadSink>>;
    /// Delete a session and its chunks.
    async fn session_delete(&self, image_id: &str, session: &str) -> Result<()>;

    /// Delete what an interrupted direct upload of `image_id` left: its objects that are not
    /// in `keep` (upload sessions excluded) and, in a local store, its unfinished staging
    /// files. Only call it while nobody uploads to the image. Returns the count removed.
    async fn discard_partial(&self, _image_id: &str, _keep: &HashSet<String>) -> Result<usize> {
        Ok(0)
    }
}

/// One stored chunk of an upload session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chunk {
    /// Where the chunk starts in the image.
    pub offset: u64,
    /// Its length.
    pub len: u64,
    /// Where it is stored (for [`ImageData::read`]).
    pub location: String,
}

/// The marker object that makes a session exist.
const SESSION_MARKER: &str = "session";

fn session_prefix(image_id: &str, session: &str) -> String {
    format!("{IMAGES_PREFIX}/{image_id}/sessions/{session}")
}

/// One object per upload in an `object_store`.
#[derive(Debug, Clone)]
pub struct WholeObjectData {
    store: Arc<dyn ObjectStore>,
    /// For a local-filesystem store, its root: the reaper also removes the staging files
    /// (`<object>#<n>`) that an upload interrupted by a crash leaves, which the store's
    /// listing does not show.
    local_root: Option<PathBuf>,
}

impl WholeObjectData {
    /// Image data over `store`.
    pub fn new(store: Arc<dyn ObjectStore>) -> Self {
        WholeObjectData {
            store,
            local_root: None,
        }
    }

    /// Image data over a `LocalFileSystem` rooted at `root`.
    pub fn local(store: Arc<dyn ObjectStore>, root: PathBuf) -> Self {
        WholeObjectData {
            store,
            local_root: Some(root),
        }
    }

    /// A multipart upload of a new object under `prefix/image_id/`.
    async fn start_upload(&self, prefix: &str, image_id: &str) -> Result<Box<dyn UploadSink>> {
        let location = format!("{prefix}/{image_id}/{}", uuid::Uuid::new_v4());
        let path = Self::path(&location)?;
        let upload = self
            .store
            .put_multipart(&path)
            .await
            .map_err(|e| RegistryError::store("starting an upload", e))?;
        Ok(Box::new(ObjectUpload {
            location,
            writer: WriteMultipart::new_with_chunk_size(upload, PART_BYTES),
        }))
    }

    fn path(location: &str) -> Result<ObjPath> {
        let p = ObjPath::parse(location)
            .map_err(|e| RegistryError::store(format!("bad location '{location}'"), e))?;
        let top = location.split('/').next().unwrap_or("");
        if top != IMAGES_PREFIX && !AREAS.contains(&top) {
            return Err(RegistryError::store(
                format!("bad location '{location}'"),
                "not under the images prefix",
            ));
        }
        Ok(p)
    }
}

struct ObjectUpload {
    location: String,
    writer: WriteMultipart,
}

#[async_trait]
impl UploadSink for ObjectUpload {
    fn location(&self) -> &str {
        &self.location
    }

    async fn write(&mut self, chunk: Bytes) -> Result<()> {
        self.writer
            .wait_for_capacity(PART_CONCURRENCY)
            .await
            .map_err(|e| RegistryError::store("writing image data", e))?;
        self.writer.put(chunk);
        Ok(())
    }

    async fn finish(self: Box<Self>) -> Result<()> {
        self.writer
            .finish()
            .await
            .map_err(|e| RegistryError::store("completing an upload", e))?;
        Ok(())
    }

    async fn abort(self: Box<Self>) {
        if let Err(e) = self.writer.abort().await {
            eprintln!(
                "vmi-registry: aborting upload {}: {e}; the reaper will remove it",
                self.location
            );
        }
    }
}

#[async_trait]
impl ImageData for WholeObjectData {
    async fn begin(&self, image_id: &str) -> Result<Box<dyn UploadSink>> {
        self.start_upload(IMAGES_PREFIX, image_id).await
    }

    async fn begin_in(&self, area: &str, image_id: &str) -> Result<Box<dyn UploadSink>> {
        if !AREAS.contains(&area) {
            return Err(RegistryError::store(
                format!("bad area '{area}'"),
                "not a data area",
            ));
        }
        self.start_upload(area, image_id).await
    }

    async fn read(&self, location: &str, range: Option<Range<u64>>) -> Result<ByteStream> {
        let path = Self::path(location)?;
        let opts = GetOptions {
            range: range.map(GetRange::Bounded),
            ..Default::default()
        };
        let got = self
            .store
            .get_opts(&path, opts)
            .await
            .map_err(|e| RegistryError::store("reading image data", e))?;
        match got.payload {
            // Local files: read in large blocks (the store's own stream reads 8 KiB at a time).
            GetResultPayload::File(mut file, _) => {
                let r = got.range.clone();
                let file = tokio::task::spawn_blocking(move || {
                    file.seek(SeekFrom::Start(r.start)).map(|_| file)
                })
                .await
                .map_err(|e| RegistryError::store("reading image data", e))?
                .map_err(|e| RegistryError::io("seeking in image data", e))?;
                let len = got.range.end.saturating_sub(got.range.start);
                let reader = tokio::fs::File::from_std(file).take(len);
                Ok(ReaderStream::with_capacity(reader, READ_BYTES).boxed())
            }
            GetResultPayload::Stream(s) => Ok(s.map_err(io::Error::other).boxed()),
        }
    }

    fn random_access(&self, location: &str, size: u64) -> Result<Box<dyn Storage>> {
        Ok(Box::new(ObjectReader {
            store: self.store.clone(),
            path: Self::path(location)?,
            len: size,
            handle: tokio::runtime::Handle::try_current()
                .map_err(|e| RegistryError::store("inspecting image data", e))?,
        }))
    }

    async fn delete(&self, location: &str) -> Result<()> {
        match self.store.delete(&Self::path(location)?).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(RegistryError::store("deleting image data", e)),
        }
    }

    async fn session_create(&self, image_id: &str, session: &str) -> Result<()> {
        let p = Self::path(&format!(
            "{}/{SESSION_MARKER}",
            session_prefix(image_id, session)
        ))?;
        self.store
            .put(&p, Bytes::new().into())
            .await
            .map_err(|e| RegistryError::store("creating an upload session", e))?;
        Ok(())
    }

    async fn session_chunks(&self, image_id: &str, session: &str) -> Result<Option<Vec<Chunk>>> {
        let prefix = ObjPath::from(session_prefix(image_id, session));
        let mut listing = self.store.list(Some(&prefix));
        let mut marker = false;
        let mut chunks = Vec::new();
        while let Some(meta) = listing.next().await {
            let meta = meta.map_err(|e| RegistryError::store("listing an upload session", e))?;
            let name = meta.location.filename().unwrap_or_default();
            if name == SESSION_MARKER {
                marker = true;
            } else if let Ok(offset) = name.parse::<u64>() {
                chunks.push(Chunk {
                    offset,
                    len: meta.size,
                    location: meta.location.to_string(),
                });
            }
        }
        if !marker {
            return Ok(None);
        }
        chunks.sort_by_key(|c| c.offset);
        let mut next = 0u64;
        for c in &chunks {
            if c.offset != next {
                return Err(RegistryError::store(
                    "reading an upload session",
                    format!("chunk at {} where {next} was expected", c.offset),
                ));
            }
            next = next.saturating_add(c.len);
        }
        Ok(Some(chunks))
    }

    async fn session_append(
        &self,
        image_id: &str,
        session: &str,
        offset: u64,
    ) -> Result<Box<dyn UploadSink>> {
        let location = format!("{}/{offset:020}", session_prefix(image_id, session));
        let upload = self
            .store
            .put_multipart(&Self::path(&location)?)
            .await
            .map_err(|e| RegistryError::store("starting a chunk", e))?;
        Ok(Box::new(ObjectUpload {
            location,
            writer: WriteMultipart::new_with_chunk_size(upload, PART_BYTES),
        }))
    }

    async fn session_delete(&self, image_id: &str, session: &str) -> Result<()> {
        let prefix = ObjPath::from(session_prefix(image_id, session));
        let mut listing = self.store.list(Some(&prefix));
        let mut doomed = Vec::new();
        while let Some(meta) = listing.next().await {
            doomed.push(
                meta.map_err(|e| RegistryError::store("listing an upload session", e))?
                    .location,
            );
        }
        for p in doomed {
            match self.store.delete(&p).await {
                Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
                Err(e) => return Err(RegistryError::store("deleting an upload session", e)),
            }
        }
        Ok(())
    }

    async fn discard_partial(&self, image_id: &str, keep: &HashSet<String>) -> Result<usize> {
        let dir = format!("{IMAGES_PREFIX}/{image_id}");
        let sessions = format!("{dir}/sessions/");
        let prefix = Self::path(&dir)?;
        let mut doomed = Vec::new();
        let mut objects = self.store.list(Some(&prefix));
        while let Some(meta) = objects.next().await {
            let meta = meta.map_err(|e| RegistryError::store("listing image data", e))?;
            let loc = meta.location.as_ref();
            if !loc.starts_with(&sessions) && !keep.contains(loc) {
                doomed.push(meta.location);
            }
        }
        let mut n = doomed.len();
        for p in doomed {
            match self.store.delete(&p).await {
                Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
                Err(e) => return Err(RegistryError::store("removing partial upload data", e)),
            }
        }
        if let Some(root) = self.local_root.clone() {
            let local = root.join(&dir);
            n += tokio::task::spawn_blocking(move || -> io::Result<usize> {
                let entries = match std::fs::read_dir(&local) {
                    Ok(d) => d,
                    Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(0),
                    Err(e) => return Err(e),
                };
                let mut n = 0;
                for f in entries {
                    let f = f?;
                    if f.file_type()?.is_file() && is_staging_name(&f.file_name().to_string_lossy())
                    {
                        match std::fs::remove_file(f.path()) {
                            Ok(()) => n += 1,
                            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                            Err(e) => return Err(e),
                        }
                    }
                }
                Ok(n)
            })
            .await
            .map_err(|e| RegistryError::store("removing partial upload data", e))?
            .map_err(|e| RegistryError::io("removing partial upload data", e))?;
        }
        Ok(n)
    }

    async fn reap(&self, keep: &HashSet<String>, grace: Duration) -> Result<usize> {
        let cutoff = chrono::Utc::now()
            - chrono::Duration::from_std(grace).unwrap_or(chrono::Duration::zero());
        let mut doomed = Vec::new();
        for top in std::iter::once(IMAGES_PREFIX).chain(AREAS) {
            let prefix = ObjPath::from(top);
            let mut objects = self.store.list(Some(&prefix));
            while let Some(meta) = objects.next().await {
                let meta = meta.map_err(|e| RegistryError::store("listing image data", e))?;
                if !keep.contains(meta.location.as_ref()) && meta.last_modified < cutoff {
                    doomed.push(meta.location);
                }
            }
        }
        let mut n = doomed.len();
        for p in doomed {
            match self.store.delete(&p).await {
                Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
                Err(e) => return Err(RegistryError::store("reaping image data", e)),
            }
        }
        if let Some(root) = self.local_root.clone() {
            n += tokio::task::spawn_blocking(move || {
                let cutoff = SystemTime::now() - grace;
                std::iter::once(IMAGES_PREFIX)
                    .chain(AREAS)
                    .map(|top| reap_staging(&root.join(top), cutoff))
                    .sum::<io::Result<usize>>()
            })
            .await
            .map_err(|e| RegistryError::store("reaping staging files", e))?
            .map_err(|e| RegistryError::io("reaping staging files", e))?;
        }
        Ok(n)
    }
}

/// Whether `name` is a local store's staging file name: `<object>#<digits>`.
fn is_staging_name(name: &str) -> bool {
    match name.rsplit_once('#') {
        Some((_, n)) => !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()),
        None => false,
    }
}

/// Delete staging files under `images/<image-id>/` last modified before `cutoff`.
fn reap_staging(images: &std::path::Path, cutoff: SystemTime) -> io::Result<usize> {
    let mut n = 0;
    let dirs = match std::fs::read_dir(images) {
        Ok(d) => d,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(e),
    };
    for dir in dirs {
        let dir = dir?;
        if !dir.file_type()?.is_dir() {
            continue;
        }
        for f in std::fs::read_dir(dir.path())? {
            let f = f?;
            let name = f.file_name();
            let old = f.metadata()?.modified()? < cutoff;
            if f.file_type()?.is_file() && is_staging_name(&name.to_string_lossy()) && old {
                match std::fs::remove_file(f.path()) {
                    Ok(()) => n += 1,
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                    Err(e) => return Err(e),
                }
            }
        }
    }
    Ok(n)
}

/// Blocking random access to one stored object, for [`vmi_disk::inspect::inspect`].
struct ObjectReader {
    store: Arc<dyn ObjectStore>,
    path: ObjPath,
    len: u64,
    handle: tokio::runtime::Handle,
}

impl std::fmt::Debug for ObjectReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ObjectReader({})", self.path)
    }
}

fn read_only() -> io::Error {
    io::Error::new(
        io::ErrorKind::PermissionDenied,
        "stored image data is read-only",
    )
}

impl Storage for ObjectReader {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        if buf.is_empty() {
            return Ok(());
        }
        let end = offset
            .checked_add(buf.len() as u64)
            .filter(|e| *e <= self.len)
            .ok_or_else(|| io::Error::new(io::ErrorKind::UnexpectedEof, "read past the end"))?;
        let got = self
            .handle
            .block_on(self.store.get_range(&self.path, offset..end))
            .map_err(io::Error::other)?;
        if got.len() != buf.len() {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("short read: {} of {} bytes", got.len(), buf.len()),
            ));
        }
        buf.copy_from_slice(&got);
        Ok(())
    }

    fn write_at(&self, _buf: &[u8], _offset: u64) -> io::Result<()> {
        Err(read_only())
    }

    fn len(&self) -> io::Result<u64> {
        Ok(self.len)
    }

    fn set_len(&self, _len: u64) -> io::Result<()> {
        Err(read_only())
    }

    fn sync(&self) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use object_store::memory::InMemory;

    #[tokio::test]
    async fn an_upload_is_readable_whole_and_by_range_and_random_access() {
        let d = WholeObjectData::new(Arc::new(InMemory::new()));
        let mut s = d.begin("img").await.unwrap();
        let loc = s.location().to_string();
        s.write(Bytes::from_static(b"hello ")).await.unwrap();
        s.write(Bytes::from_static(b"world")).await.unwrap();
        s.finish().await.unwrap();
        let all: Vec<Bytes> = d
            .read(&loc, None)
            .await
            .unwrap()
            .try_collect()
            .await
            .unwrap();
        assert_eq!(all.concat(), b"hello world");
        let part: Vec<Bytes> = d
            .read(&loc, Some(6..11))
            .await
            .unwrap()
            .try_collect()
            .await
            .unwrap();
        assert_eq!(part.concat(), b"world");
        let d2 = d.clone();
        let loc2 = loc.clone();
        let got = tokio::task::spawn_blocking(move || {
            let r = d2.random_access(&loc2, 11).unwrap();
            let mut b = [0u8; 5];
            r.read_at(&mut b, 0).unwrap();
            assert!(r.read_at(&mut b, 8).is_err());
            b
        })
        .await
        .unwrap();
        assert_eq!(&got, b"hello");
    }

    #[tokio::test]
    async fn reap_removes_staging_files_of_interrupted_local_uploads() {
        let dir = tempfile::tempdir().unwrap();
        let fs = object_store::local::LocalFileSystem::new_with_prefix(dir.path()).unwrap();
        let d = WholeObjectData::local(Arc::new(fs), dir.path().to_path_buf());
        let mut s = d.begin("img").await.unwrap();
        let live = s.location().to_string();
        s.write(Bytes::from_static(b"kept")).await.unwrap();
        s.finish().await.unwrap();
        // What a crash in the middle of an upload leaves behind.
        let img_dir = dir.path().join("images/img");
        std::fs::write(img_dir.join("0b4c#1"), b"partial").unwrap();
        std::fs::write(img_dir.join("name#tag"), b"not staging").unwrap();
        let keep: HashSet<String> = [live.clone()].into_iter().collect();
        assert_eq!(d.reap(&keep, Duration::from_secs(3600)).await.unwrap(), 0);
        assert_eq!(d.reap(&keep, Duration::ZERO).await.unwrap(), 2);
        assert!(!img_dir.join("0b4c#1").exists());
        assert!(d.read(&live, None).await.is_ok());
    }

    #[tokio::test]
    async fn an_aborted_upload_leaves_nothing_and_reap_keeps_live_objects() {
        let d = WholeObjectData::new(Arc::new(InMemory::new()));
        let mut s = d.begin("img").await.unwrap();
        s.write(Bytes::from_static(b"x")).await.unwrap();
        let gone = s.location().to_string();
        s.abort().await;
        assert!(d.read(&gone, None).await.is_err());
        let mut keep = HashSet::new();
        for _ in 0..2 {
            let mut s = d.begin("img").await.unwrap();
            s.write(Bytes::from_static(b"y")).await.unwrap();
            keep.insert(s.location().to_string());
            s.finish().await.unwrap();
        }
        let orphan = keep.iter().next().cloned().unwrap();
        keep.remove(&orphan);
        assert_eq!(d.reap(&keep, Duration::ZERO).await.unwrap(), 1);
        assert!(d.read(&orphan, None).await.is_err());
        assert_eq!(keep.len(), 1);
    }
}
