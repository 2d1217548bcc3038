//! Block formats: how captured records are serialized (CSV, NDJSON, Parquet, raw bytes) and
//! compressed (gzip, zstd).
//!
//! [`writers`] is called once per capture, at startup: it derives the layout (Arrow schema, CSV
//! columns) from the payload type, so a type that a format cannot hold is refused before the first
//! message arrives. The factory it returns makes one [`BlockWriter`] per block. Writers stream into
//! their output as records arrive, so a block in progress costs about its (compressed) size.

use std::any::{type_name, Any};
use std::fmt::{self, Write as _};
use std::io::{self, Read, Write};
use std::marker::PhantomData;
use std::sync::Arc;

use arrow_schema::{DataType, Field, FieldRef, Schema};
use bytes::Bytes;
use parquet::arrow::ArrowWriter;
use parquet::file::properties::WriterProperties;
use serde::{de::DeserializeOwned, Serialize};
use serde_arrow::schema::{SchemaLike, TracingOptions};
use serde_arrow::ArrayBuilder;
use serde_json::Value;

/// How the records of a block are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlockFormat {
    /// Comma-separated values with a header row; columns from the record type's fields.
    Csv,
    /// One JSON document per line.
    Ndjson,
    /// Apache Parquet; the schema from the record type.
    Parquet,
    /// The message payloads as received, each prefixed by its length (u32, big-endian).
    Raw,
}

impl BlockFormat {
    /// Parses a format name as written in `#[capture(format = "...")]`: `csv`, `ndjson`, `parquet` or `raw`.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "csv" => Some(Self::Csv),
            "ndjson" => Some(Self::Ndjson),
            "parquet" => Some(Self::Parquet),
            "raw" => Some(Self::Raw),
            _ => None,
        }
    }

    /// The format's name, as [`BlockFormat::parse`] accepts it.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Csv => "csv",
            Self::Ndjson => "ndjson",
            Self::Parquet => "parquet",
            Self::Raw => "raw",
        }
    }
}

impl fmt::Display for BlockFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How a block is compressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    /// Not compressed.
    None,
    /// gzip.
    Gzip,
    /// Zstandard.
    Zstd,
}

impl Compression {
    /// Parses a compression name as written in `#[capture(compression = "...")]`: `none`, `gzip` or `zstd`.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "none" => Some(Self::None),
            "gzip" => Some(Self::Gzip),
            "zstd" => Some(Self::Zstd),
            _ => None,
        }
    }

    /// The compression's name, as [`Compression::parse`] accepts it.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::None => "none",
            Self::Gzip => "gzip",
            Self::Zstd => "zstd",
        }
    }
}

impl fmt::Display for Compression {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A format or layout problem, with the record type and field at fault.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct FormatError(pub String);

/// Writes one block. Records are appended as they arrive; `finish` returns the block's bytes.
pub trait BlockWriter: Send {
    /// Appends one record: `record` is the decoded payload (a `T`), `raw` its message payload.
    ///
    /// On error the record is not in the block and the earlier records are intact, except with
    /// Parquet: its writer then refuses every further call, and the block must be dropped.
    fn append(&mut self, record: &(dyn Any + Send), raw: &[u8]) -> Result<(), FormatError>;
    /// Completes the block (footer, compression trailer) and returns its bytes.
    fn finish(self: Box<Self>) -> Result<Vec<u8>, FormatError>;
    /// About how many bytes the writer holds now (buffers, compressor state), for the capture's
    /// memory budget. `None` (the default) makes the capture count the payload bytes appended.
    fn memory(&self) -> Option<usize> {
        None
    }
}

/// Makes a fresh writer for each block.
pub type WriterFactory = std::sync::Arc<dyn Fn() -> Box<dyn BlockWriter> + Send + Sync>;

/// Records buffered before they are encoded into Parquet column chunks.
const PARQUET_CHUNK: usize = 1024;
/// Zstandard level for CSV, NDJSON and raw blocks: the library's default trade-off.
const ZSTD_LEVEL: i32 = 3;
/// Uncompressed bytes a CSV, NDJSON or raw block keeps before its compressor starts. A
/// compressor holds state of its own (see `ZSTD_STATE`, `GZIP_STATE`) whatever the block's size:
/// with many keys, most blocks stay small, and paying it for each open one would cost far more
/// than their data. Below this a block is compressed in one go when it is finished.
const COMPRESS_AFTER: usize = 256 << 10;
/// Where a block's compressor starts (see `COMPRESS_AFTER`). For zstd, at the size of the
/// compressor's own state: a plain buffer that large holds no more memory than the compressor
/// would, and a block compressed in one go when it is finished (in a blocking thread, off the
/// reading task) costs less CPU than streaming it through level 3 (3.84 -> 3.06 us per captured
/// message in the benchmark, ten keys of 10,000-record blocks).
fn compress_after(compression: Compression) -> usize {
    match compression {
        Compression::Zstd => ZSTD_STATE,
        _ => COMPRESS_AFTER,
    }
}

/// Bytes staged before they are handed to a compressor: a record at a time (a line of NDJSON,
/// a field of CSV) each call into zstd or deflate costs more than compressing the record.
const COMPRESS_STAGE: usize = 32 << 10;
/// About what a zstd level-3 streaming compressor holds (window, hash and chain tables).
const ZSTD_STATE: usize = 1_300 << 10;
/// About what a gzip (miniz_oxide) compressor holds, with flate2's output buffer.
const GZIP_STATE: usize = 300 << 10;
/// The buffer of a `csv::Writer`.
const CSV_BUFFER: usize = 8 << 10;

/// Makes the writer factory for a capture whose payload type is `T`.
///
/// # Examples
///
/// ```
/// use natty_runtime::capture::format::{writers, BlockFormat, Compression};
///
/// #[derive(serde::Serialize, serde::Deserialize)]
/// struct Reading {
///     sensor: String,
///     celsius: f64,
/// }
///
/// let factory = writers::<Reading>(BlockFormat::Csv, Compression::None)?;
/// let mut block = factory();
/// block.append(&Reading { sensor: "a1".into(), celsius: 21.5 }, b"")?;
/// assert_eq!(block.finish()?, b"sensor,celsius\na1,21.5\n");
/// # Ok::<(), natty_runtime::capture::format::FormatError>(())
/// ```
///
/// # Errors
///
/// When `T` does not fit the format: no Arrow schema can be traced from it (CSV, Parquet: it must
/// be a struct, and `serde_json::Value` fields are not), it has lists, maps or binary fields (CSV),
/// or enums with data (CSV, Parquet). The error names the type and the field. NDJSON and raw take
/// any type.
pub fn writers<T>(format: BlockFormat, compression: Compression) -> Result<WriterFactory, FormatError>
where
    T: Serialize + DeserializeOwned + Send + Sync + 'static,
{
    // NDJSON and raw need no schema: tracing one would refuse types serde_json handles fine.
    match format {
        BlockFormat::Raw => factory(move || {
            Ok(Box::new(RawWriter {
                out: Sink::new(compression)?,
            }))
        }),
        BlockFormat::Ndjson => factory(move || {
            Ok(Box::new(NdjsonWriter::<T> {
                out: Sink::new(compression)?,
                line: Vec::new(),
                record: PhantomData,
            }))
        }),
        BlockFormat::Csv => {
            let columns: Arc<[Vec<String>]> = csv_columns(type_name::<T>(), &trace::<T>(format)?)?.into();
            factory(move || Ok(Box::new(CsvWriter::<T>::new(columns.clone(), compression)?)))
        }
        BlockFormat::Parquet => {
            let fields = trace::<T>(format)?;
            if let Some(path) = fields
                .iter()
                .find_map(|field| find_union(field.name(), field.data_type()))
            {
                return Err(FormatError(format!(
                    "payload type `{}` cannot be written as Parquet: field `{path}` is an enum with data, \
                     which Parquet has no type for (use format = \"ndjson\")",
                    type_name::<T>()
                )));
            }
            let schema = Arc::new(Schema::new(fields.clone()));
            let codec = match compression {
                Compression::None => parquet::basic::Compression::UNCOMPRESSED,
                Compression::Gzip => parquet::basic::Compression::GZIP(Default::default()),
                Compression::Zstd => parquet::basic::Compression::ZSTD(Default::default()),
            };
            let props = WriterProperties::builder().set_compression(codec).build();
            factory(move || Ok(Box::new(ParquetWriter::<T>::new(&fields, &schema, &props)?)))
        }
    }
}

/// The file extension of a block, without the leading dot (`csv.gz`, `parquet`, `bin.zst`, ...).
pub fn extension(format: BlockFormat, compression: Compression) -> &'static str {
    match (format, compression) {
        (BlockFormat::Csv, Compression::None) => "csv",
        (BlockFormat::Csv, Compression::Gzip) => "csv.gz",
        (BlockFormat::Csv, Compression::Zstd) => "csv.zst",
        (BlockFormat::Ndjson, Compression::None) => "ndjson",
        (BlockFormat::Ndjson, Compression::Gzip) => "ndjson.gz",
        (BlockFormat::Ndjson, Compression::Zstd) => "ndjson.zst",
        // Parquet compresses its pages internally; the file itself is never wrapped.
        (BlockFormat::Parquet, _) => "parquet",
        (BlockFormat::Raw, Compression::None) => "bin",
        (BlockFormat::Raw, Compression::Gzip) => "bin.gz",
        (BlockFormat::Raw, Compression::Zstd) => "bin.zst",
    }
}

/// Splits an uncompressed raw block into its message payloads.
///
/// # Errors
///
/// When the block ends inside a frame (a length prefix or a payload).
pub fn read_raw(block: &[u8]) -> Result<Vec<Bytes>, FormatError> {
    // One copy of the block; the payloads are slices of it.
    let block = Bytes::copy_from_slice(block);
    let mut payloads = Vec::new();
    let mut at = 0;
    while at < block.len() {
        let Some(prefix) = block.get(at..at + 4) else {
            return Err(FormatError(format!(
                "raw block truncated: frame {} at byte {at} has {} of its 4 length bytes",
                payloads.len(),
                block.len() - at
            )));
        };
        let len = u32::from_be_bytes([prefix[0], prefix[1], prefix[2], prefix[3]]) as usize;
        let start = at + 4;
        let end = start
            .checked_add(len)
            .filter(|&end| end <= block.len())
            .ok_or_else(|| {
                FormatError(format!(
                    "raw block truncated: frame {} at byte {at} declares {len} bytes but {} remain",
                    payloads.len(),
                    block.len() - start
                ))
            })?;
        payloads.push(block.slice(start..end));
        at = end;
    }
    Ok(payloads)
}

/// Undoes a block's compression (CSV, NDJSON and raw blocks; Parquet is never wrapped).
///
/// # Errors
///
/// When `bytes` is not a valid stream of that compression.
pub fn decompress(bytes: &[u8], compression: Compression) -> Result<Vec<u8>, FormatError> {
    let mut out = Vec::new();
    let read = match compression {
        Compression::None => return Ok(bytes.to_vec()),
        Compression::Gzip => flate2::read::GzDecoder::new(bytes).read_to_end(&mut out).map(|_| out),
        Compression::Zstd => zstd::decode_all(bytes),
    };
    read.map_err(|e| FormatError(format!("cannot decompress a {compression} block: {e}")))
}

/// Wraps a writer maker into a [`WriterFactory`], making one writer now so that whatever would fail
/// for every block (a schema Parquet cannot hold, a compressor that cannot start) fails at startup.
fn factory<F>(make: F) -> Result<WriterFactory, FormatError>
where
    F: Fn() -> Result<Box<dyn BlockWriter>, FormatError> + Send + Sync + 'static,
{
    make()?;
    // The factory cannot fail, so a writer that could not be made reports why on its first call.
    Ok(Arc::new(move || make().unwrap_or_else(|err| Box::new(Failed(err.0)))))
}

/// The Arrow schema of `T`, traced from its `Deserialize` impl.
fn trace<T: DeserializeOwned>(format: BlockFormat) -> Result<Vec<FieldRef>, FormatError> {
    let options = TracingOptions::default()
        .allow_null_fields(true) // `()` and `Option<()>` fields become Arrow Null columns
        .enums_without_data_as_strings(true) // unit enums as dictionary-encoded strings
        .map_as_struct(false) // a map's keys are data, not columns
        .strings_as_large_utf8(false)
        .bytes_as_large_binary(false)
        .sequence_as_large_list(false);
    Vec::<FieldRef>::from_type::<T>(options).map_err(|e| {
        let e = e.to_string();
        FormatError(format!(
            "cannot derive a {format} schema from payload type `{}` ({format} needs a struct whose layout \
             follows from its type; format = \"ndjson\" takes any type): {}",
            type_name::<T>(),
            e.strip_prefix("Error: ").unwrap_or(&e)
        ))
    })
}

/// The CSV columns of a schema: one per scalar leaf, nested structs flattened, each as its field
/// path from the record's root (`["address", "city"]`, headed `address.city`).
fn csv_columns(type_name: &str, fields: &[FieldRef]) -> Result<Vec<Vec<String>>, FormatError> {
    fn walk(field: &Field, path: &mut Vec<String>, out: &mut Vec<Vec<String>>) -> Result<(), String> {
        path.push(field.name().clone());
        // Parquet holds everything but enums with data; NDJSON holds everything.
        const EITHER: &str = "format = \"ndjson\" or \"parquet\"";
        let refused = match field.data_type() {
            DataType::Struct(children) => {
                children.iter().try_for_each(|child| walk(child, path, out))?;
                None
            }
            DataType::Null | DataType::Boolean | DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View => None,
            DataType::Dictionary(_, values) if matches!(**values, DataType::Utf8 | DataType::LargeUtf8) => None,
            t if t.is_primitive() => None, // numbers, decimals, dates, times
            DataType::List(_)
            | DataType::LargeList(_)
            | DataType::FixedSizeList(..)
            | DataType::ListView(_)
            | DataType::LargeListView(_) => Some(("is a list".to_owned(), EITHER)),
            DataType::Map(..) => Some(("is a map".to_owned(), EITHER)),
            DataType::Union(..) => Some(("is an enum with data".to_owned(), "format = \"ndjson\"")),
            DataType::Binary | DataType::LargeBinary | DataType::FixedSizeBinary(_) | DataType::BinaryView => {
                Some(("is binary data".to_owned(), EITHER))
            }
            other => Some((
                format!("has the Arrow type {other}, which has no CSV text form"),
                EITHER,
            )),
        };
        if let Some((what, hint)) = refused {
            return Err(format!(
                "field `{}` {what}; CSV needs flat records (use {hint})",
                path.join(".")
            ));
        }
        if !matches!(field.data_type(), DataType::Struct(_)) {
            out.push(path.clone());
        }
        path.pop();
        Ok(())
    }

    let refuse = |why: String| FormatError(format!("payload type `{type_name}` cannot be written as CSV: {why}"));
    let mut columns = Vec::new();
    for field in fields {
        walk(field, &mut Vec::new(), &mut columns).map_err(refuse)?;
    }
    if columns.is_empty() {
        return Err(refuse("it has no fields".to_owned()));
    }
    let mut headers: Vec<String> = columns.iter().map(|path| path.join(".")).collect();
    headers.sort_unstable();
    if let Some(pair) = headers.windows(2).find(|pair| pair[0] == pair[1]) {
        return Err(refuse(format!("two fields flatten to the column `{}`", pair[0])));
    }
    Ok(columns)
}

/// The path of the first enum with data (an Arrow union) in a field of type `data_type`, checked
/// before Parquet sees the schema: parquet 59 panics (`unimplemented!`) on a union.
fn find_union(path: &str, data_type: &DataType) -> Option<String> {
    match data_type {
        DataType::Union(..) => Some(path.to_owned()),
        DataType::Struct(fields) => fields
            .iter()
            .find_map(|field| find_union(&format!("{path}.{}", field.name()), field.data_type())),
        DataType::List(item)
        | DataType::LargeList(item)
        | DataType::FixedSizeList(item, _)
        | DataType::ListView(item)
        | DataType::LargeListView(item) => find_union(&format!("{path}[]"), item.data_type()),
        // A map's entries are a struct of `key` and `value`.
        DataType::Map(entries, _) => find_union(path, entries.data_type()),
        DataType::Dictionary(_, values) => find_union(path, values),
        _ => None,
    }
}

/// `record` as the capture's payload type; another type is a caller bug, reported, not a panic.
fn downcast<T: 'static>(record: &(dyn Any + Send), format: BlockFormat) -> Result<&T, FormatError> {
    record.downcast_ref::<T>().ok_or_else(|| {
        FormatError(format!(
            "the {format} writer for `{}` was given a record of another type",
            type_name::<T>()
        ))
    })
}

fn io_error(format: BlockFormat, e: impl fmt::Display) -> FormatError {
    FormatError(format!("cannot write the {format} block: {e}"))
}

/// The output of a CSV, NDJSON or raw block: kept plain while it is small, then compressed as
/// it is written (see `COMPRESS_AFTER`).
enum Sink {
    Plain(Vec<u8>),
    /// Not compressed yet: below `compress_after`, or no compression asked.
    Pending(Vec<u8>, Compression),
    Gzip(io::BufWriter<flate2::write::GzEncoder<Vec<u8>>>),
    Zstd(io::BufWriter<zstd::stream::write::Encoder<'static, Vec<u8>>>),
}

impl Sink {
    fn new(compression: Compression) -> Result<Self, FormatError> {
        Ok(match compression {
            Compression::None => Self::Plain(Vec::new()),
            compression => Self::Pending(Vec::new(), compression),
        })
    }

    /// Starts the compressor and passes it what was kept plain so far.
    fn start_compressing(&mut self) -> io::Result<()> {
        let Self::Pending(plain, compression) = self else {
            return Ok(());
        };
        let mut started = match compression {
            Compression::None => return Ok(()),
            Compression::Gzip => Self::Gzip(io::BufWriter::with_capacity(
                COMPRESS_STAGE,
                flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default()),
            )),
            Compression::Zstd => Self::Zstd(io::BufWriter::with_capacity(
                COMPRESS_STAGE,
                zstd::stream::write::Encoder::new(Vec::new(), ZSTD_LEVEL)?,
            )),
        };
        started.write_all(plain)?;
        *self = started;
        Ok(())
    }

    /// Writes the compression trailer and returns the bytes.
    fn finish(mut self) -> io::Result<Vec<u8>> {
        if let Self::Pending(plain, Compression::Zstd) = &self {
            return zstd::stream::encode_all(&plain[..], ZSTD_LEVEL);
        }
        self.start_compressing()?;
        match self {
            Self::Plain(bytes) | Self::Pending(bytes, _) => Ok(bytes),
            Self::Gzip(staged) => staged.into_inner().map_err(|e| e.into_error())?.finish(),
            Self::Zstd(staged) => staged.into_inner().map_err(|e| e.into_error())?.finish(),
        }
    }

    /// About how many bytes it holds.
    fn memory(&self) -> usize {
        match self {
            Self::Plain(bytes) | Self::Pending(bytes, _) => bytes.capacity(),
            Self::Gzip(staged) => staged.capacity() + staged.get_ref().get_ref().capacity() + GZIP_STATE,
            Self::Zstd(staged) => staged.capacity() + staged.get_ref().get_ref().capacity() + ZSTD_STATE,
        }
    }
}

impl Write for Sink {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Self::Plain(bytes) => bytes.write(buf),
            Self::Pending(plain, compression) => {
                plain.extend_from_slice(buf);
                if plain.len() >= compress_after(*compression) {
                    self.start_compressing()?;
                }
                Ok(buf.len())
            }
            Self::Gzip(encoder) => encoder.write(buf),
            Self::Zstd(encoder) => encoder.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            Self::Plain(bytes) | Self::Pending(bytes, _) => bytes.flush(),
            Self::Gzip(encoder) => encoder.flush(),
            Self::Zstd(encoder) => encoder.flush(),
        }
    }
}

/// Stands in for a writer that could not be made, and says why.
struct Failed(String);

impl BlockWriter for Failed {
    fn append(&mut self, _: &(dyn Any + Send), _: &[u8]) -> Result<(), FormatError> {
        Err(FormatError(self.0.clone()))
    }

    fn finish(self: Box<Self>) -> Result<Vec<u8>, FormatError> {
        Err(FormatError(self.0))
    }
}

struct RawWriter {
    out: Sink,
}

impl BlockWriter for RawWriter {
    fn append(&mut self, _: &(dyn Any + Send), raw: &[u8]) -> Result<(), FormatError> {
        let len = u32::try_from(raw.len()).map_err(|_| {
            FormatError(format!(
                "a {} byte payload does not fit a raw block frame (at most {} bytes)",
                raw.len(),
                u32::MAX
            ))
        })?;
        self.out
            .write_all(&len.to_be_bytes())
            .and_then(|()| self.out.write_all(raw))
            .map_err(|e| io_error(BlockFormat::Raw, e))
    }

    fn finish(self: Box<Self>) -> Result<Vec<u8>, FormatError> {
        self.out.finish().map_err(|e| io_error(BlockFormat::Raw, e))
    }

    fn memory(&self) -> Option<usize> {
        Some(self.out.memory())
    }
}

struct NdjsonWriter<T> {
    out: Sink,
    /// The line being serialized: a record that fails halfway never reaches the block.
    line: Vec<u8>,
    record: PhantomData<fn(&T)>,
}

impl<T: Serialize + Send + 'static> BlockWriter for NdjsonWriter<T> {
    fn append(&mut self, record: &(dyn Any + Send), _: &[u8]) -> Result<(), FormatError> {
        let record = downcast::<T>(record, BlockFormat::Ndjson)?;
        self.line.clear();
        serde_json::to_writer(&mut self.line, record).map_err(|e| {
            FormatError(format!(
                "cannot write a record of `{}` as NDJSON: {e}",
                type_name::<T>()
            ))
        })?;
        self.line.push(b'\n');
        self.out
            .write_all(&self.line)
            .map_err(|e| io_error(BlockFormat::Ndjson, e))
    }

    fn finish(self: Box<Self>) -> Result<Vec<u8>, FormatError> {
        self.out.finish().map_err(|e| io_error(BlockFormat::Ndjson, e))
    }

    fn memory(&self) -> Option<usize> {
        Some(self.out.memory() + self.line.capacity())
    }
}

struct CsvWriter<T> {
    out: csv::Writer<Sink>,
    columns: Arc<[Vec<String>]>,
    /// Scratch for a number's text.
    number: String,
    record: PhantomData<fn(&T)>,
}

/// One CSV cell, borrowed from the record's JSON value.
enum Cell<'a> {
    Empty,
    Text(&'a str),
    Number(&'a serde_json::Number),
    Bool(bool),
}

impl<T> CsvWriter<T> {
    fn new(columns: Arc<[Vec<String>]>, compression: Compression) -> Result<Self, FormatError> {
        let mut out = csv::Writer::from_writer(Sink::new(compression)?);
        out.write_record(columns.iter().map(|path| path.join(".")))
            .map_err(|e| io_error(BlockFormat::Csv, e))?;
        Ok(Self {
            out,
            columns,
            number: String::new(),
            record: PhantomData,
        })
    }
}

impl<T: Serialize + Send + 'static> BlockWriter for CsvWriter<T> {
    fn append(&mut self, record: &(dyn Any + Send), _: &[u8]) -> Result<(), FormatError> {
        let record = downcast::<T>(record, BlockFormat::Csv)?;
        let fail = |why: String| FormatError(format!("cannot write a record of `{}` as CSV: {why}", type_name::<T>()));
        let value = serde_json::to_value(record).map_err(|e| fail(e.to_string()))?;
        // Every cell is looked up before any is written, so a record that does not fit leaves the
        // block untouched. A path that is absent (a `None` struct, a skipped field) is an empty cell.
        let mut cells = Vec::with_capacity(self.columns.len());
        for path in self.columns.iter() {
            cells.push(match path.iter().try_fold(&value, |value, key| value.get(key)) {
                None | Some(Value::Null) => Cell::Empty,
                Some(Value::String(s)) => Cell::Text(s),
                Some(Value::Number(n)) => Cell::Number(n),
                Some(Value::Bool(b)) => Cell::Bool(*b),
                // Only a `Serialize` impl that disagrees with the type's `Deserialize` gets here.
                Some(Value::Array(_) | Value::Object(_)) => {
                    return Err(fail(format!(
                        "field `{}` serialized as a list or map, but the type's schema says it is a scalar",
                        path.join(".")
                    )))
                }
            });
        }
        for cell in cells {
            let written = match cell {
                Cell::Empty => self.out.write_field(""),
                Cell::Text(s) => self.out.write_field(s),
                Cell::Bool(b) => self.out.write_field(if b { "true" } else { "false" }),
                Cell::Number(n) => {
                    self.number.clear();
                    let _ = write!(self.number, "{n}"); // writing to a String cannot fail
                    self.out.write_field(&self.number)
                }
            };
            written.map_err(|e| io_error(BlockFormat::Csv, e))?;
        }
        self.out
            .write_record(None::<&[u8]>)
            .map_err(|e| io_error(BlockFormat::Csv, e))
    }

    fn finish(self: Box<Self>) -> Result<Vec<u8>, FormatError> {
        let sink = self
            .out
            .into_inner()
            .map_err(|e| io_error(BlockFormat::Csv, e.error()))?;
        sink.finish().map_err(|e| io_error(BlockFormat::Csv, e))
    }

    fn memory(&self) -> Option<usize> {
        Some(self.out.get_ref().memory() + CSV_BUFFER)
    }
}

struct ParquetWriter<T> {
    /// Records not yet encoded, as Arrow arrays under construction.
    rows: ArrayBuilder,
    buffered: usize,
    /// The payload bytes of the buffered records: about what `rows` holds.
    buffered_bytes: usize,
    out: ArrowWriter<Vec<u8>>,
    /// Why the block was abandoned: serde_arrow cannot roll back a half-pushed record, so after a
    /// failure the builder's columns may disagree in length and nothing more can be written.
    broken: Option<String>,
    record: PhantomData<fn(&T)>,
}

impl<T> ParquetWriter<T> {
    fn new(fields: &[FieldRef], schema: &Arc<Schema>, props: &WriterProperties) -> Result<Self, FormatError> {
        let refuse = |e: &dyn fmt::Display| {
            FormatError(format!(
                "payload type `{}` cannot be written as Parquet: {e}",
                type_name::<T>()
            ))
        };
        Ok(Self {
            rows: ArrayBuilder::from_arrow(fields).map_err(|e| refuse(&e))?,
            buffered: 0,
            buffered_bytes: 0,
            out: ArrowWriter::try_new(Vec::new(), schema.clone(), Some(props.clone())).map_err(|e| refuse(&e))?,
            broken: None,
            record: PhantomData,
        })
    }

    /// Encodes the buffered records into the Parquet writer's column chunks.
    fn flush(&mut self) -> Result<(), FormatError> {
        let batch = self.rows.to_record_batch().map_err(|e| e.to_string());
        let written = batch.and_then(|batch| self.out.write(&batch).map_err(|e| e.to_string()));
        self.buffered = 0;
        self.buffered_bytes = 0;
        written.map_err(|e| self.abandon(e))
    }

    fn check(&self) -> Result<(), FormatError> {
        self.broken.as_ref().map_or(Ok(()), |why| Err(FormatError(why.clone())))
    }

    fn abandon(&mut self, why: String) -> FormatError {
        let why = format!(
            "cannot write a record of `{}` as Parquet, block abandoned: {why}",
            type_name::<T>()
        );
        self.broken = Some(why.clone());
        FormatError(why)
    }
}

impl<T: Serialize + Send + 'static> BlockWriter for ParquetWriter<T> {
    fn append(&mut self, record: &(dyn Any + Send), raw: &[u8]) -> Result<(), FormatError> {
        self.check()?;
        let record = downcast::<T>(record, BlockFormat::Parquet)?;
        self.rows.push(record).map_err(|e| self.abandon(e.to_string()))?;
        self.buffered += 1;
        self.buffered_bytes += raw.len();
        if self.buffered >= PARQUET_CHUNK {
            self.flush()?;
        }
        Ok(())
    }

    fn finish(mut self: Box<Self>) -> Result<Vec<u8>, FormatError> {
        self.check()?;
        if self.buffered > 0 {
            self.flush()?;
        }
        self.out.into_inner().map_err(|e| io_error(BlockFormat::Parquet, e))
    }

    fn memory(&self) -> Option<usize> {
        Some(self.buffered_bytes + self.out.memory_size() + self.out.inner().capacity())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
    use serde::Deserialize;

    const COMPRESSIONS: [Compression; 3] = [Compression::None, Compression::Gzip, Compression::Zstd];
    const FORMATS: [BlockFormat; 4] = [
        BlockFormat::Csv,
        BlockFormat::Ndjson,
        BlockFormat::Parquet,
        BlockFormat::Raw,
    ];
    /// Enough records for Parquet to encode three chunks, the last one partial.
    const RECORDS: u64 = 2_500;

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    enum Status {
        Open,
        Shipped,
    }

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct Address {
        city: String,
        zip: Option<u32>,
    }

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct Order {
        id: u64,
        customer: String,
        total: f64,
        paid: bool,
        note: Option<String>,
        status: Status,
        address: Option<Address>,
    }

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct Item {
        sku: String,
        qty: u32,
    }

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct Basket {
        id: u64,
        items: Vec<Item>,
    }

    fn orders() -> Vec<Order> {
        (0..RECORDS)
            .map(|i| Order {
                id: i,
                // Commas, quotes and newlines: the CSV writer must quote them.
                customer: format!("Smith, \"J\" {i}\nLtd"),
                total: i as f64 * 1.37 + 0.1,
                paid: i % 2 == 0,
                note: (i % 3 == 0).then(|| format!("note {i}")),
                status: if i % 4 == 0 { Status::Shipped } else { Status::Open },
                address: (i % 5 != 0).then(|| Address {
                    city: format!("City {}", i % 7),
                    zip: (i % 2 == 0).then_some(i as u32),
                }),
            })
            .collect()
    }

    /// Writes `records` as one block, with each record's JSON as its raw payload.
    fn write_block<T>(format: BlockFormat, compression: Compression, records: &[T]) -> Vec<u8>
    where
        T: Serialize + DeserializeOwned + Send + Sync + 'static,
    {
        let mut writer = writers::<T>(format, compression).expect("layout")();
        for record in records {
            writer
                .append(record, &serde_json::to_vec(record).expect("json"))
                .expect("append");
        }
        writer.finish().expect("finish")
    }

    /// Reads a Parquet block back: its records and the codec of every column chunk.
    fn read_parquet<T: DeserializeOwned>(block: Vec<u8>) -> (Vec<T>, Vec<parquet::basic::Compression>) {
        let reader = ParquetRecordBatchReaderBuilder::try_new(Bytes::from(block)).expect("parquet file");
        let meta = reader.metadata().clone();
        let codecs = meta
            .row_groups()
            .iter()
            .flat_map(|group| group.columns().iter().map(|c| c.compression()));
        let mut records = Vec::new();
        for batch in reader.build().expect("reader") {
            records.extend(serde_arrow::from_record_batch::<Vec<T>>(&batch.expect("batch")).expect("records"));
        }
        (records, codecs.collect())
    }

    fn empty_to_none(cell: &str) -> Option<&str> {
        (!cell.is_empty()).then_some(cell)
    }

    #[test]
    fn csv_flattens_nested_structs_and_reads_back() {
        let records = orders();
        for compression in COMPRESSIONS {
            let text = decompress(&write_block(BlockFormat::Csv, compression, &records), compression).unwrap();
            let mut reader = csv::Reader::from_reader(text.as_slice());
            let headers = [
                "id",
                "customer",
                "total",
                "paid",
                "note",
                "status",
                "address.city",
                "address.zip",
            ];
            assert_eq!(reader.headers().unwrap(), &csv::StringRecord::from(headers.to_vec()));
            let back: Vec<Order> = reader
                .records()
                .map(|row| {
                    let row = row.unwrap();
                    let city = empty_to_none(&row[6]);
                    Order {
                        id: row[0].parse().unwrap(),
                        customer: row[1].to_owned(),
                        total: row[2].parse().unwrap(),
                        paid: row[3].parse().unwrap(),
                        note: empty_to_none(&row[4]).map(str::to_owned),
                        status: serde_json::from_value(Value::String(row[5].to_owned())).unwrap(),
                        address: city.map(|city| Address {
                            city: city.to_owned(),
                            zip: empty_to_none(&row[7]).map(|zip| zip.parse().unwrap()),
                        }),
                    }
                })
                .collect();
            assert_eq!(back, records, "{compression}");
        }
    }

    #[test]
    fn ndjson_reads_back_line_by_line() {
        let records = orders();
        for compression in COMPRESSIONS {
            let text = decompress(&write_block(BlockFormat::Ndjson, compression, &records), compression).unwrap();
            let text = String::from_utf8(text).unwrap();
            // serde_json parses floats to within 1 ulp (exact only with its `float_roundtrip`
            // feature), so the lines are compared as text; they must still read back as `Order`s.
            let lines: Vec<&str> = text.lines().collect();
            let expected: Vec<String> = records.iter().map(|r| serde_json::to_string(r).unwrap()).collect();
            assert_eq!(lines, expected, "{compression}");
            let back: Vec<Order> = lines.iter().map(|line| serde_json::from_str(line).unwrap()).collect();
            assert_eq!(back.len(), records.len());
        }
    }

    #[test]
    fn small_blocks_hold_no_compressor_and_big_ones_compress_as_they_go() {
        for compression in [Compression::Gzip, Compression::Zstd] {
            let factory = writers::<serde_json::Value>(BlockFormat::Raw, compression).unwrap();
            let payload = [7u8; 1000];
            let mut small = factory();
            small.append(&serde_json::Value::Null, &payload).unwrap();
            // Its data, without a compressor's state.
            assert!(small.memory().unwrap() < 8 << 10, "{compression}");
            let mut big = factory();
            for _ in 0..1000 {
                big.append(&serde_json::Value::Null, &payload).unwrap();
            }
            // Past `compress_after` the rest goes through the compressor (a million repeated
            // bytes hold far less than a megabyte of output); below it, zstd's plain buffer holds
            // no more than its compressor would.
            let held = big.memory().unwrap();
            assert!(held < (64 << 10) + ZSTD_STATE.max(GZIP_STATE), "{compression}: {held}");
            for block in [small, big] {
                let frames = read_raw(&decompress(&block.finish().unwrap(), compression).unwrap()).unwrap();
                assert!(frames.iter().all(|frame| frame[..] == payload[..]), "{compression}");
            }
        }
    }

    #[test]
    fn parquet_reads_back_with_the_chosen_codec() {
        let records = orders();
        for compression in COMPRESSIONS {
            let (back, codecs) = read_parquet::<Order>(write_block(BlockFormat::Parquet, compression, &records));
            assert_eq!(back, records, "{compression}");
            assert!(!codecs.is_empty());
            for codec in codecs {
                use parquet::basic::Compression as Codec;
                let expected = matches!(
                    (compression, codec),
                    (Compression::None, Codec::UNCOMPRESSED)
                        | (Compression::Gzip, Codec::GZIP(_))
                        | (Compression::Zstd, Codec::ZSTD(_))
                );
                assert!(expected, "{compression} block has a {codec:?} column");
            }
        }
    }

    #[test]
    fn parquet_holds_lists_of_structs() {
        let baskets: Vec<Basket> = (0..RECORDS)
            .map(|id| Basket {
                id,
                items: (0..id % 4)
                    .map(|n| Item {
                        sku: format!("sku-{n}"),
                        qty: n as u32,
                    })
                    .collect(),
            })
            .collect();
        let (back, _) = read_parquet::<Basket>(write_block(BlockFormat::Parquet, Compression::Zstd, &baskets));
        assert_eq!(back, baskets);
    }

    #[test]
    fn raw_frames_the_payloads_as_received() {
        let payloads: Vec<Vec<u8>> = (0..RECORDS).map(|i| vec![i as u8; (i % 300) as usize]).collect();
        for compression in COMPRESSIONS {
            let mut writer = writers::<Order>(BlockFormat::Raw, compression).unwrap()();
            for payload in &payloads {
                // The decoded record is not looked at: any value will do.
                writer.append(&(), payload).unwrap();
            }
            let block = decompress(&writer.finish().unwrap(), compression).unwrap();
            assert_eq!(read_raw(&block).unwrap(), payloads, "{compression}");
        }
    }

    #[test]
    fn read_raw_refuses_truncated_frames() {
        let err = read_raw(&[0, 0, 0, 5, 1, 2]).unwrap_err().to_string();
        assert!(err.contains("declares 5 bytes but 2 remain"), "{err}");
        let err = read_raw(&[0, 0, 0, 1, 9, 0, 0]).unwrap_err().to_string();
        assert!(err.contains("frame 1 at byte 5 has 2 of its 4 length bytes"), "{err}");
    }

    #[test]
    fn empty_blocks_are_valid_files() {
        for format in FORMATS {
            for compression in COMPRESSIONS {
                let block = writers::<Order>(format, compression).unwrap()().finish().unwrap();
                match format {
                    BlockFormat::Parquet => {
                        let reader = ParquetRecordBatchReaderBuilder::try_new(Bytes::from(block)).unwrap();
                        assert_eq!(reader.metadata().file_metadata().num_rows(), 0);
                        assert_eq!(reader.schema().fields().len(), 7);
                    }
                    BlockFormat::Csv => {
                        let text = decompress(&block, compression).unwrap();
                        let mut reader = csv::Reader::from_reader(text.as_slice());
                        assert_eq!(reader.headers().unwrap().len(), 8);
                        assert_eq!(reader.records().count(), 0);
                    }
                    BlockFormat::Ndjson | BlockFormat::Raw => {
                        assert!(
                            decompress(&block, compression).unwrap().is_empty(),
                            "{format} {compression}"
                        );
                    }
                }
            }
        }
    }

    /// The startup error of `T` in `format`.
    fn refusal<T: Serialize + DeserializeOwned + Send + Sync + 'static>(format: BlockFormat) -> String {
        writers::<T>(format, Compression::None)
            .err()
            .expect("refused")
            .to_string()
    }

    #[test]
    fn formats_refuse_what_they_cannot_hold_at_startup() {
        let err = refusal::<Basket>(BlockFormat::Csv);
        assert!(
            err.contains("Basket` cannot be written as CSV: field `items` is a list"),
            "{err}"
        );

        #[derive(Serialize, Deserialize)]
        enum Shape {
            Circle(f64),
        }
        #[derive(Serialize, Deserialize)]
        struct Drawing {
            shape: Shape,
        }
        #[derive(Serialize, Deserialize)]
        struct Framed {
            inner: Drawing,
        }
        let err = refusal::<Framed>(BlockFormat::Csv);
        assert!(err.contains("field `inner.shape` is an enum with data"), "{err}");
        // Parquet has no union type (and parquet itself would panic on one).
        #[derive(Serialize, Deserialize)]
        struct Gallery {
            drawings: Vec<Option<Drawing>>,
        }
        let err = refusal::<Gallery>(BlockFormat::Parquet);
        assert!(
            err.contains("Parquet: field `drawings[].shape` is an enum with data"),
            "{err}"
        );
    }

    #[test]
    fn a_type_without_a_schema_is_refused_at_startup() {
        let err = refusal::<u64>(BlockFormat::Parquet);
        assert!(
            err.starts_with("cannot derive a parquet schema from payload type `u64`"),
            "{err}"
        );
        // NDJSON needs no schema.
        assert!(writers::<u64>(BlockFormat::Ndjson, Compression::None).is_ok());
    }

    #[test]
    fn a_record_of_another_type_is_an_error_not_a_panic() {
        let record = &orders()[..1];
        for format in [BlockFormat::Csv, BlockFormat::Ndjson, BlockFormat::Parquet] {
            let mut writer = writers::<Order>(format, Compression::None).unwrap()();
            let err = writer.append(&42_u32, b"42").unwrap_err().to_string();
            assert!(err.contains("given a record of another type"), "{err}");
            // The block is still good.
            writer.append(&record[0], b"").unwrap();
            let block = writer.finish().unwrap();
            let rows = match format {
                BlockFormat::Parquet => read_parquet::<Order>(block).0.len(),
                BlockFormat::Csv => csv::Reader::from_reader(block.as_slice()).records().count(),
                _ => block.iter().filter(|&&b| b == b'\n').count(),
            };
            assert_eq!(rows, 1, "{format}");
        }
    }

    #[test]
    fn names_parse_and_extensions() {
        for format in FORMATS {
            assert_eq!(BlockFormat::parse(format.as_str()), Some(format));
        }
        for compression in COMPRESSIONS {
            assert_eq!(Compression::parse(&compression.to_string()), Some(compression));
        }
        assert_eq!(BlockFormat::parse("json"), None);
        assert_eq!(extension(BlockFormat::Csv, Compression::Gzip), "csv.gz");
        assert_eq!(extension(BlockFormat::Ndjson, Compression::Zstd), "ndjson.zst");
        assert_eq!(extension(BlockFormat::Parquet, Compression::Zstd), "parquet");
        assert_eq!(extension(BlockFormat::Raw, Compression::None), "bin");
    }
}
