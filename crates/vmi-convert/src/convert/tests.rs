//! Tests of the copy engine over in-memory sources and a recording target driver.

use super::*;
use std::any::Any;
use std::path::Path;
use std::sync::Arc;
use vmi_disk::gate::Gate;
use vmi_disk::storage::{FailPoint, MemStorage, Storage};
use vmi_disk::{CreateOptions, Driver, Format, MapKind, Mapping};

const UNIT: u64 = 64 * 1024;

/// How a test source lays out one 64 KiB unit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum U {
    Data,
    Zero,
    Unalloc,
}

/// A source whose mapping is given unit by unit; data lives at its guest offset in `storage`.
#[derive(Debug)]
struct Layout {
    storage: MemStorage,
    units: Vec<U>,
    backing: Option<vmi_disk::BackingSpec>,
}

impl Driver for Layout {
    fn format(&self) -> Format {
        Format::Raw
    }
    fn virtual_size(&self) -> u64 {
        self.units.len() as u64 * UNIT
    }
    fn map(&self, offset: u64, len: u64) -> Result<Mapping> {
        let i = (offset / UNIT) as usize;
        let kind = self.units[i];
        let mut end = (offset / UNIT + 1) * UNIT;
        while (end / UNIT) < self.units.len() as u64 && self.units[(end / UNIT) as usize] == kind {
            end += UNIT;
        }
        Ok(Mapping {
            start: offset,
            len: (end - offset).min(len),
            kind: match kind {
                U::Data => MapKind::Data { file: 0, offset },
                U::Zero => MapKind::Zero,
                U::Unalloc => MapKind::Unallocated,
            },
        })
    }
    fn file(&self, _index: usize) -> Result<&dyn Storage> {
        Ok(&self.storage)
    }
    fn backing(&self) -> Option<&vmi_disk::BackingSpec> {
        self.backing.as_ref()
    }
    fn as_any(&self) -> &dyn Any {
        self
    }
}

/// A target that records every write, can insist on increasing order, and can take
/// "compressed" units (stored verbatim, so the result is checkable).
#[derive(Debug)]
struct Recorder {
    storage: MemStorage,
    size: u64,
    sequential: bool,
    unit: Option<u64>,
    cluster: Option<u64>,
    log: Mutex<Vec<(u64, u64, &'static str)>>,
}

impl Recorder {
    fn new(size: u64) -> Self {
        Recorder {
            storage: MemStorage::from_bytes(vec![0; size as usize]),
            size,
            sequential: false,
            unit: None,
            cluster: None,
            log: Mutex::new(Vec::new()),
        }
    }
    fn record(&self, offset: u64, len: u64, what: &'static str) -> Result<()> {
        let mut log = self.log.lock().unwrap();
        if self.sequential {
            if let Some(&(o, l, _)) = log.last() {
                if offset < o + l {
                    return Err(Error::usage(format!(
                        "write at {offset} after write ending at {}",
                        o + l
                    )));
                }
            }
        }
        log.push((offset, len, what));
        Ok(())
    }
}

impl Driver for Recorder {
    fn format(&self) -> Format {
        Format::Raw
    }
    fn virtual_size(&self) -> u64 {
        self.size
    }
    fn map(&self, offset: u64, len: u64) -> Result<Mapping> {
        Ok(Mapping {
            start: offset,
            len: len.min(self.size - offset),
            kind: MapKind::Data { file: 0, offset },
        })
    }
    fn file(&self, _index: usize) -> Result<&dyn Storage> {
        Ok(&self.storage)
    }
    fn is_writable(&self) -> bool {
        true
    }
    fn write_at(&self, buf: &[u8], offset: u64, _b: Option<&Image>) -> Result<()> {
        self.record(offset, buf.len() as u64, "data")?;
        self.storage
            .write_at(buf, offset)
            .map_err(|e| Error::io("w", e))
    }
    fn write_zeroes(&self, offset: u64, len: u64, _b: Option<&Image>) -> Result<()> {
        self.record(offset, len, "zero")?;
        self.storage
            .write_zeroes(offset, len)
            .map_err(|e| Error::io("z", e))
    }
    fn sequential_only(&self) -> bool {
        self.sequential
    }
    fn info(&self) -> vmi_disk::FormatInfo {
        vmi_disk::FormatInfo {
            cluster_size: self.cluster,
            ..Default::default()
        }
    }
    fn compressed_writer(&self) -> Option<&dyn CompressedWrite> {
        self.unit.map(|_| self as &dyn CompressedWrite)
    }
    fn as_any(&self) -> &dyn Any {
        self
    }
}

impl CompressedWrite for Recorder {
    fn unit_size(&self) -> u64 {
        self.unit.unwrap_or(0)
    }
    fn compress(&self, data: &[u8]) -> Result<Option<Vec<u8>>> {
        assert_eq!(
            data.len() as u64,
            self.unit_size(),
            "units are compressed whole"
        );
        // Units starting with 0xff "do not compress" and are written plain.
        Ok((data[0] != 0xff).then(|| data.to_vec()))
    }
    fn write_compressed(&self, offset: u64, c: &[u8]) -> Result<()> {
        assert_eq!(offset % self.unit_size(), 0);
        self.record(offset, c.len() as u64, "compressed")?;
        let n = (c.len() as u64).min(self.size - offset) as usize;
        self.storage
            .write_at(&c[..n], offset)
            .map_err(|e| Error::io("c", e))
    }
}

/// Guest content for a layout: unit `i` of kind Data holds bytes derived from `i`.
fn content(units: &[U]) -> Vec<u8> {
    let mut v = vec![0u8; units.len() * UNIT as usize];
    for (i, u) in units.iter().enumerate() {
        if *u == U::Data {
            for (j, b) in v[i * UNIT as usize..(i + 1) * UNIT as usize]
                .iter_mut()
                .enumerate()
            {
                *b = (i * 7 + j / 4096 + 1) as u8;
            }
        }
    }
    v
}

fn source(units: &[U]) -> Image {
    let storage = MemStorage::from_bytes(content(units));
    source_over(storage, units)
}

fn source_over(storage: MemStorage, units: &[U]) -> Image {
    let d = Layout {
        storage,
        units: units.to_vec(),
        backing: None,
    };
    Image::from_driver(Box::new(d), Path::new("src.img"))
}

fn recorder(rec: Recorder) -> Image {
    Image::from_driver(Box::new(rec), Path::new("dst.img"))
}

fn rec(img: &Image) -> &Recorder {
    img.driver().as_any().downcast_ref::<Recorder>().unwrap()
}

fn opts(workers: usize, out_of_order: bool) -> ConvertOptions {
    ConvertOptions {
        workers,
        min_sparse: 4096,
        out_of_order,
        ..Default::default()
    }
}

fn mixed_units(n: usize) -> Vec<U> {
    (0..n)
        .map(|i| match i % 5 {
            0 | 3 => U::Data,
            1 => U::Zero,
            _ => U::Unalloc,
        })
        .collect()
}

#[test]
fn every_worker_count_and_ordering_produces_the_source_content() {
    let units = mixed_units(97);
    for workers in [1, 2, 8] {
        for ooo in [false, true] {
            let src = source(&units);
            let dst = recorder(Recorder::new(src.virtual_size()));
            convert(&src, &dst, &opts(workers, ooo)).unwrap();
            assert_eq!(
                rec(&dst).storage.to_vec(),
                content(&units),
                "{workers} {ooo}"
            );
        }
    }
}

#[test]
fn random_layouts_convert_exactly_in_every_mode() {
    use rand::{Rng, SeedableRng};
    for seed in 0..12u64 {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let n = rng.gen_range(1..80);
        let units: Vec<U> = (0..n)
            .map(|_| match rng.gen_range(0..3) {
                0 => U::Data,
                1 => U::Zero,
                _ => U::Unalloc,
            })
            .collect();
        let mut bytes = content(&units);
        for _ in 0..rng.gen_range(0..20) {
            let at = rng.gen_range(0..bytes.len());
            let len = rng.gen_range(1..20_000).min(bytes.len() - at);
            if units[at / UNIT as usize] == U::Data {
                bytes[at..at + len].fill(0);
            }
        }
        // Zero and unallocated units read as zero whatever the storage holds.
        for (i, u) in units.iter().enumerate() {
            if *u != U::Data {
                bytes[i * UNIT as usize..(i + 1) * UNIT as usize].fill(0);
            }
        }
        let workers = rng.gen_range(1..6);
        let min_sparse = [0, 512, 4096, 65536][rng.gen_range(0..4)];
        for (sequential, unit, compress, ooo) in [
            (false, None, false, false),
            (false, None, false, true),
            (true, Some(UNIT), false, true),
            (false, Some(UNIT), true, true),
            (true, Some(2 * UNIT), true, false),
        ] {
            let src = source_over(MemStorage::from_bytes(bytes.clone()), &units);
            let mut r = Recorder::new(src.virtual_size());
            r.sequential = sequential;
            r.unit = unit;
            let dst = recorder(r);
            let o = ConvertOptions {
                workers,
                min_sparse,
                out_of_order: ooo,
                compress,
                ..Default::default()
            };
            let stats = convert(&src, &dst, &o).unwrap();
            assert_eq!(stats.data_bytes + stats.zero_bytes, src.virtual_size());
            assert!(
                rec(&dst).storage.to_vec() == bytes,
                "seed {seed}, {sequential} {unit:?} {compress} {ooo}"
            );
        }
    }
}

#[test]
fn zero_and_unallocated_ranges_are_neither_read_nor_written() {
    let units = [U::Zero, U::Unalloc, U::Data, U::Zero];
    let storage = MemStorage::from_bytes(content(&units));
    // Reading anything but unit 2 would fail.
    storage.fail(FailPoint::ReadAt(10));
    storage.fail(FailPoint::ReadAt(UNIT + 10));
    storage.fail(FailPoint::ReadAt(3 * UNIT + 10));
    let src = source_over(storage, &units);
    let dst = recorder(Recorder::new(src.virtual_size()));
    let stats = convert(&src, &dst, &opts(2, false)).unwrap();
    assert_eq!(
        *rec(&dst).log.lock().unwrap(),
        vec![(2 * UNIT, UNIT, "data")]
    );
    assert_eq!(
        stats,
        ConvertStats {
            data_bytes: UNIT,
            zero_bytes: 3 * UNIT
        }
    );
}

#[test]
fn a_target_with_data_gets_explicit_zeroes() {
    let units = [U::Data, U::Zero, U::Unalloc, U::Data];
    let src = source(&units);
    let dst = recorder(Recorder::new(src.virtual_size()));
    rec(&dst)
        .storage
        .write_at(&[0xee; 4 * UNIT as usize], 0)
        .unwrap();
    let o = ConvertOptions {
        target_has_data: true,
        ..opts(2, false)
    };
    convert(&src, &dst, &o).unwrap();
    assert_eq!(rec(&dst).storage.to_vec(), content(&units));
    assert!(rec(&dst)
        .log
        .lock()
        .unwrap()
        .contains(&(UNIT, 2 * UNIT, "zero")));
}

#[test]
fn zero_blocks_inside_data_are_skipped_at_min_sparse_granularity() {
    let units = [U::Data; 2];
    let mut bytes = content(&units);
    bytes[4096..3 * 4096].fill(0);
    let src = source_over(MemStorage::from_bytes(bytes.clone()), &units);
    let dst = recorder(Recorder::new(src.virtual_size()));
    let stats = convert(&src, &dst, &opts(1, false)).unwrap();
    assert_eq!(stats.zero_bytes, 2 * 4096);
    assert_eq!(
        *rec(&dst).log.lock().unwrap(),
        vec![(0, 4096, "data"), (3 * 4096, 2 * UNIT - 3 * 4096, "data")]
    );
    assert_eq!(rec(&dst).storage.to_vec(), bytes);
}

#[test]
fn zero_detection_is_raised_to_the_target_cluster_size() {
    let units = [U::Data; 2];
    let mut bytes = content(&units);
    bytes[4096..3 * 4096].fill(0);
    bytes[UNIT as usize..].fill(0);
    let src = source_over(MemStorage::from_bytes(bytes.clone()), &units);
    let mut r = Recorder::new(src.virtual_size());
    r.cluster = Some(UNIT);
    let dst = recorder(r);
    convert(&src, &dst, &opts(1, false)).unwrap();
    // The first cluster is written whole, zero blocks and all; the all-zero second is skipped.
    assert_eq!(*rec(&dst).log.lock().unwrap(), vec![(0, UNIT, "data")]);
    assert_eq!(rec(&dst).storage.to_vec(), bytes);
}

#[test]
fn min_sparse_zero_writes_every_byte() {
    let units = [U::Data, U::Zero, U::Unalloc];
    let src = source(&units);
    let dst = recorder(Recorder::new(src.virtual_size()));
    let o = ConvertOptions {
        min_sparse: 0,
        ..opts(1, false)
    };
    let stats = convert(&src, &dst, &o).unwrap();
    assert_eq!(stats.data_bytes, 3 * UNIT);
    assert_eq!(*rec(&dst).log.lock().unwrap(), vec![(0, 3 * UNIT, "data")]);
}

#[test]
fn a_sequential_target_sees_increasing_offsets_with_many_workers() {
    let units = mixed_units(300);
    let src = source(&units);
    let mut r = Recorder::new(src.virtual_size());
    r.sequential = true;
    let dst = recorder(r);
    // out_of_order is ignored for a sequential-only target.
    convert(&src, &dst, &opts(8, true)).unwrap();
    assert_eq!(rec(&dst).storage.to_vec(), content(&units));
}

#[test]
fn compressed_output_is_written_whole_units_in_order() {
    let mut units = mixed_units(70);
    units[40] = U::Data;
    let mut bytes = content(&units);
    bytes[40 * UNIT as usize] = 0xff; // this unit "does not compress"
    let src = source_over(MemStorage::from_bytes(bytes.clone()), &units);
    let mut r = Recorder::new(src.virtual_size());
    r.sequential = true;
    r.unit = Some(UNIT);
    let dst = recorder(r);
    let o = ConvertOptions {
        compress: true,
        ..opts(4, true)
    };
    convert(&src, &dst, &o).unwrap();
    assert_eq!(rec(&dst).storage.to_vec(), bytes);
    let log = rec(&dst).log.lock().unwrap();
    assert!(log.contains(&(40 * UNIT, UNIT, "data")));
    assert!(log
        .iter()
        .filter(|l| l.2 == "compressed")
        .all(|l| l.0 % UNIT == 0 && l.1 == UNIT));
}

#[test]
fn a_sequential_target_with_units_gets_each_unit_once_and_whole() {
    let units = mixed_units(40);
    let mut bytes = content(&units);
    // A zero block inside a data unit must not split that unit into two writes.
    bytes[4096..8192].fill(0);
    let src = source_over(MemStorage::from_bytes(bytes.clone()), &units);
    let mut r = Recorder::new(src.virtual_size());
    r.sequential = true;
    r.unit = Some(UNIT);
    let dst = recorder(r);
    convert(&src, &dst, &opts(4, true)).unwrap();
    assert_eq!(rec(&dst).storage.to_vec(), bytes);
    let log = rec(&dst).log.lock().unwrap();
    assert!(log
        .iter()
        .all(|l| l.2 == "data" && l.0 % UNIT == 0 && l.1 % UNIT == 0));
}

#[test]
fn a_partial_last_unit_is_padded_with_zeroes_for_compression() {
    // A 100 KiB image with 64 KiB units: the second unit has 36 KiB of guest data.
    let size = 100 * 1024;
    let bytes: Vec<u8> = (0..size).map(|i| (i % 251 + 1) as u8).collect();
    let s = MemStorage::from_bytes(bytes.clone());
    let src = Image::from_storage(
        Box::new(s),
        Path::new("src.raw"),
        Some(Format::Raw),
        false,
        &Gate::new(),
    )
    .unwrap();
    let mut r = Recorder::new(size as u64);
    r.unit = Some(UNIT);
    let dst = recorder(r);
    let o = ConvertOptions {
        compress: true,
        ..opts(2, false)
    };
    convert(&src, &dst, &o).unwrap();
    assert_eq!(rec(&dst).storage.to_vec(), bytes);
}

#[test]
fn compressing_into_a_format_without_compression_is_refused() {
    let src = source(&[U::Data]);
    let dst = recorder(Recorder::new(UNIT));
    let o = ConvertOptions {
        compress: true,
        ..opts(1, false)
    };
    let e = convert(&src, &dst, &o).unwrap_err();
    assert_eq!(e.kind(), vmi_disk::ErrorKind::Unsupported);
}

#[test]
fn shallow_copies_the_top_layer_only_and_zeroes_what_it_zeroes() {
    let top_units = [U::Unalloc, U::Data, U::Zero, U::Unalloc];
    let mut src = source(&top_units);
    let base = source(&[U::Data; 4]);
    src.set_backing(Some(base));
    let dst = recorder(Recorder::new(src.virtual_size()));
    let o = ConvertOptions {
        shallow: true,
        ..opts(2, false)
    };
    convert(&src, &dst, &o).unwrap();
    assert_eq!(
        *rec(&dst).log.lock().unwrap(),
        vec![(UNIT, UNIT, "data"), (2 * UNIT, UNIT, "zero")]
    );
}

#[test]
fn a_full_copy_refuses_a_source_whose_backing_was_not_opened() {
    let units = [U::Data, U::Unalloc];
    let src = Image::from_driver(
        Box::new(Layout {
            storage: MemStorage::from_bytes(content(&units)),
            units: units.to_vec(),
            backing: Some(vmi_disk::BackingSpec {
                name: "base.img".into(),
                format: None,
            }),
        }),
        Path::new("top.img"),
    );
    let dst = recorder(Recorder::new(src.virtual_size()));
    let e = convert(&src, &dst, &opts(1, false)).unwrap_err();
    assert_eq!(e.kind(), vmi_disk::ErrorKind::Usage, "{e}");
    // A shallow copy leaves that range to the target's backing instead.
    let o = ConvertOptions {
        shallow: true,
        ..opts(1, false)
    };
    convert(&src, &dst, &o).unwrap();
    assert_eq!(*rec(&dst).log.lock().unwrap(), vec![(0, UNIT, "data")]);
}

#[test]
fn a_read_error_mid_way_stops_the_conversion_and_names_the_source() {
    let units = vec![U::Data; 200];
    let storage = MemStorage::from_bytes(content(&units));
    storage.fail(FailPoint::ReadAt(100 * UNIT + 5));
    let src = source_over(storage, &units);
    for workers in [1, 4] {
        for ooo in [false, true] {
            let dst = recorder(Recorder::new(src.virtual_size()));
            let e = convert(&src, &dst, &opts(workers, ooo)).unwrap_err();
            assert_eq!(e.path(), Some(Path::new("src.img")), "{e}");
            // Nothing far beyond the failure point was planned and written.
            let log = rec(&dst).log.lock().unwrap();
            let limit = 100 * UNIT + in_flight_limit(workers) * CHUNK;
            assert!(log.iter().all(|l| l.0 < limit), "{workers} {ooo}");
        }
    }
}

#[test]
fn a_write_error_is_returned_with_the_target_name() {
    let units = vec![U::Data; 100];
    let src = source(&units);
    let storage = MemStorage::new();
    storage.fail(FailPoint::WriteAt(50 * UNIT));
    let dst = Image::create_on(
        Box::new(storage),
        Path::new("out.raw"),
        Format::Raw,
        &CreateOptions::new(src.virtual_size()),
    )
    .unwrap();
    for ooo in [false, true] {
        let e = convert(&src, &dst, &opts(3, ooo)).unwrap_err();
        assert_eq!(e.path(), Some(Path::new("out.raw")), "{e}");
    }
}

#[test]
fn a_smaller_target_is_refused() {
    let src = source(&[U::Data, U::Data]);
    let dst = recorder(Recorder::new(UNIT));
    let e = convert(&src, &dst, &opts(1, false)).unwrap_err();
    assert_eq!(e.kind(), vmi_disk::ErrorKind::Usage);
}

#[test]
fn progress_is_monotonic_and_reaches_the_total() {
    let units = mixed_units(200);
    let src = source(&units);
    let dst = recorder(Recorder::new(src.virtual_size()));
    let seen = Arc::new(Mutex::new(Vec::new()));
    let s2 = Arc::clone(&seen);
    let o = ConvertOptions {
        progress: Some(Arc::new(move |p: Progress| s2.lock().unwrap().push(p))),
        ..opts(4, true)
    };
    convert(&src, &dst, &o).unwrap();
    let seen = seen.lock().unwrap();
    assert!(seen.windows(2).all(|w| w[0].done < w[1].done));
    assert_eq!(seen.last().map(|p| p.done), Some(src.virtual_size()));
}

#[test]
fn an_empty_terabyte_needs_no_windows() {
    let storage = MemStorage::new();
    let src = Image::from_driver(
        Box::new(Layout {
            storage,
            units: vec![U::Unalloc; 1 << 24],
            backing: None,
        }),
        Path::new("big"),
    );
    // The recorder's storage stays empty: nothing is written.
    let dst = recorder(Recorder {
        storage: MemStorage::new(),
        size: src.virtual_size(),
        sequential: false,
        unit: None,
        cluster: None,
        log: Mutex::new(Vec::new()),
    });
    let stats = convert(&src, &dst, &opts(2, false)).unwrap();
    assert_eq!(stats.zero_bytes, 1 << 40);
    assert!(rec(&dst).log.lock().unwrap().is_empty());
}
