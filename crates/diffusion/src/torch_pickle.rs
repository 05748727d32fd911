//! Torch checkpoints (`.pth`, `.pt`, `.ckpt`, `.bin`): a reader for every format `torch.save`
//! has written since torch 0.4, and a writer for tests.
//!
//! # Reading: [`TorchFile`]
//!
//! [`TorchFile::open`] reads the object pickle (small) and keeps, for every tensor, where its
//! bytes lie in the file; [`TorchFile::get`] reads one tensor's bytes from the file when it is
//! asked for. Nothing else is held in memory: a multi-GB checkpoint costs only its tensors, one
//! at a time.
//!
//! Formats:
//! - zip (torch ≥ 1.6, `torch.save`'s default): `<name>/data.pkl` plus one stored entry
//!   `<name>/data/<key>` per storage. The archive is read with a small reader of our own:
//!   stored (and deflated) entries, zip64 records whether redundant (torch writes one into every
//!   archive) or needed (files over 4 GiB).
//! - legacy (`_use_new_zipfile_serialization=False`, what torch < 1.6 wrote, e.g. the OpenPose
//!   files): pickles of the magic number, the protocol version (1001) and a sys-info dict, the
//!   object pickle, the list of storage keys; then, for each key in that order, an 8-byte
//!   little-endian element count and the raw little-endian elements.
//!
//! Tensors are `torch._utils._rebuild_tensor{,_v2,_v3}` (and `_rebuild_parameter*`) over
//! persistent ids `('storage', <torch.XStorage>, key, location, numel[, view_metadata])`.
//! Storages: Float, Double, Half, BFloat16, Long, Int, Short, Char (read as i16), Byte and Bool
//! (read as u8). Views come out as torch shows them: any storage offset, any strides (a
//! transposed or sliced tensor is gathered into a contiguous one), several tensors over one
//! storage. The unpickler never runs anything: unknown classes become inert objects, so a
//! checkpoint with optimizer state, training arguments or numpy scalars still opens.
//!
//! Which tensors a file holds ([`TorchFile::keys`]): the top-level dict if it has tensors,
//! otherwise the first dict with tensors found under `state_dict` or `model` (in that order,
//! several levels deep: `{'model': {'state_dict': ...}}`), or under an explicit path with
//! [`TorchFile::open_under`]. Only that dict's tensor entries are kept (ints, strings, nested
//! dicts are ignored), and when every key starts with `module.` (a `DataParallel` model) the
//! prefix is dropped.
//!
//! Every error names the file and says what is wrong with it.
//!
//! # Writing: [`save`]
//!
//! ```no_run
//! use diffusion::torch_pickle::{save, Format, SaveOptions, StorageDtype, TensorData};
//! let tensors = vec![(
//!     "conv.weight".to_string(),
//!     TensorData::new(vec![2, 1, 1, 1], vec![0.5, -1.0]),
//! )];
//! let opts = SaveOptions {
//!     format: Format::Legacy,          // or Format::Zip (torch ≥ 1.6's default)
//!     dtype: StorageDtype::F16,        // F32, F16 or BF16 storages (values rounded to nearest)
//!     nest: vec!["state_dict".into()], // [] top level, ["model"], ["model", "state_dict"], ...
//!     prefix: "module.".into(),        // put before every key ("" for none)
//! };
//! save("model.pth".as_ref(), &tensors, opts).unwrap();
//! ```
//!
//! `save(path, &[(String, TensorData)], SaveOptions) -> Result<()>` writes each tensor as its
//! own contiguous storage, the state dict as an `OrderedDict` of `_rebuild_tensor_v2` calls,
//! pickle protocol 2, as torch itself does; the files load in `torch.load` with
//! `weights_only=True` (checked with torch 2.15 by `tools/parity/make_torch_pickle_fixtures.py
//! --check`). [`TensorData::from_tensor`] takes the values of a candle tensor.
use candle_core::{DType, Device, Tensor};
use std::cell::RefCell;
use std::collections::HashMap;
use std::fs::File;
use std::io::{BufReader, Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::rc::Rc;

use crate::{Error, Result};

// ---------------------------------------------------------------------------------------------
// Element types

/// The element type of a torch storage.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Elem {
    F64,
    F32,
    F16,
    BF16,
    I64,
    I32,
    I16,
    I8,
    U8,
    Bool,
}

impl Elem {
    fn from_storage_type(name: &str) -> Option<Self> {
        Some(match name {
            "DoubleStorage" => Self::F64,
            "FloatStorage" => Self::F32,
            "HalfStorage" => Self::F16,
            "BFloat16Storage" => Self::BF16,
            "LongStorage" => Self::I64,
            "IntStorage" => Self::I32,
            "ShortStorage" => Self::I16,
            "CharStorage" => Self::I8,
            "ByteStorage" => Self::U8,
            "BoolStorage" => Self::Bool,
            _ => return None,
        })
    }

    /// A `torch.<dtype>` global, as `_rebuild_tensor_v3` takes it.
    fn from_dtype_name(name: &str) -> Option<Self> {
        Some(match name {
            "float64" | "double" => Self::F64,
            "float32" | "float" => Self::F32,
            "float16" | "half" => Self::F16,
            "bfloat16" => Self::BF16,
            "int64" | "long" => Self::I64,
            "int32" | "int" => Self::I32,
            "int16" | "short" => Self::I16,
            "int8" => Self::I8,
            "uint8" => Self::U8,
            "bool" => Self::Bool,
            _ => return None,
        })
    }

    fn size(self) -> usize {
        match self {
            Self::F64 | Self::I64 => 8,
            Self::F32 | Self::I32 => 4,
            Self::F16 | Self::BF16 | Self::I16 => 2,
            Self::I8 | Self::U8 | Self::Bool => 1,
        }
    }

    /// The candle dtype it is read as (candle has no i8 or bool).
    fn dtype(self) -> DType {
        match self {
            Self::F64 => DType::F64,
            Self::F32 => DType::F32,
            Self::F16 => DType::F16,
            Self::BF16 => DType::BF16,
            Self::I64 => DType::I64,
            Self::I32 => DType::I32,
            Self::I16 | Self::I8 => DType::I16,
            Self::U8 | Self::Bool => DType::U8,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The unpickler

/// A pickled value. Containers are shared, as in Python: the memo hands out the same dict that
/// later SETITEMS fill.
#[derive(Clone, Debug)]
enum Value {
    Mark,
    None,
    Bool(bool),
    Int(i128),
    Float,
    Str(Rc<str>),
    Bytes,
    Tuple(Rc<[Value]>),
    List(Rc<RefCell<Vec<Value>>>),
    Dict(Rc<RefCell<Vec<(Value, Value)>>>),
    Global(Rc<(String, String)>),
    /// An instance of a class we know nothing of, kept inert (with what it was given).
    Object(Rc<RefCell<Object>>),
    Storage(StorageRef),
    Tensor(Rc<TensorInfo>),
    /// Something we have no use for (a too-large int, a set, ...).
    Opaque,
}

#[derive(Debug, Default)]
struct Object {
    items: Vec<(Value, Value)>,
}

/// A reference to a storage (or, in the oldest legacy files, to a view of one).
#[derive(Clone, Copy, Debug)]
struct StorageRef {
    index: usize,
    /// `None` for an untyped storage (the tensor's dtype says).
    elem: Option<Elem>,
    /// Elements of `elem` into the storage, for a legacy storage view.
    offset: usize,
}

/// A tensor as the file describes it: a view of a storage.
#[derive(Clone, Debug)]
struct TensorInfo {
    storage: usize,
    elem: Elem,
    offset: usize,
    shape: Vec<usize>,
    stride: Vec<usize>,
}

impl Value {
    fn as_str(&self) -> Option<&str> {
        match self {
            Self::Str(s) => Some(s),
            _ => None,
        }
    }

    fn as_int(&self) -> Option<i128> {
        match self {
            Self::Int(i) => Some(*i),
            Self::Bool(b) => Some(*b as i128),
            _ => None,
        }
    }

    fn as_usize(&self) -> Option<usize> {
        self.as_int().and_then(|i| usize::try_from(i).ok())
    }

    fn items(&self) -> Option<Vec<Value>> {
        match self {
            Self::Tuple(t) => Some(t.to_vec()),
            Self::List(l) => Some(l.borrow().clone()),
            _ => None,
        }
    }

    fn usizes(&self) -> Option<Vec<usize>> {
        self.items()?.iter().map(Value::as_usize).collect()
    }

    /// The entries of a dict, or of an object that is a dict subclass.
    fn dict_items(&self) -> Option<Vec<(Value, Value)>> {
        match self {
            Self::Dict(d) => Some(d.borrow().clone()),
            Self::Object(o) if !o.borrow().items.is_empty() => Some(o.borrow().items.clone()),
            _ => None,
        }
    }

    fn kind(&self) -> &'static str {
        match self {
            Self::Mark => "mark",
            Self::None => "None",
            Self::Bool(_) => "bool",
            Self::Int(_) => "int",
            Self::Float => "float",
            Self::Str(_) => "str",
            Self::Bytes => "bytes",
            Self::Tuple(_) => "tuple",
            Self::List(_) => "list",
            Self::Dict(_) => "dict",
            Self::Global(_) => "class",
            Self::Object(_) => "object",
            Self::Storage(_) => "storage",
            Self::Tensor(_) => "tensor",
            Self::Opaque => "object",
        }
    }
}

type Persistent<'a> = &'a mut dyn FnMut(Value) -> std::result::Result<Value, String>;

/// A byte source that knows how much of it is left, so that no length read from a damaged
/// file makes us allocate more than the file holds.
struct Input<R> {
    r: R,
    pos: u64,
    len: u64,
}

impl<R: Read> Input<R> {
    fn bytes(&mut self, n: u64) -> std::result::Result<Vec<u8>, String> {
        if n > self.len.saturating_sub(self.pos) {
            return Err(format!(
                "truncated: {n} bytes wanted at byte {} of {}",
                self.pos, self.len
            ));
        }
        let mut buf = vec![0; n as usize];
        self.r
            .read_exact(&mut buf)
            .map_err(|e| format!("read error at byte {}: {e}", self.pos))?;
        self.pos += n;
        Ok(buf)
    }

    fn array<const N: usize>(&mut self) -> std::result::Result<[u8; N], String> {
        Ok(self.bytes(N as u64)?.try_into().unwrap())
    }

    fn u8(&mut self) -> std::result::Result<u8, String> {
        Ok(self.array::<1>()?[0])
    }

    fn u32(&mut self) -> std::result::Result<u32, String> {
        Ok(u32::from_le_bytes(self.array()?))
    }

    fn u64(&mut self) -> std::result::Result<u64, String> {
        Ok(u64::from_le_bytes(self.array()?))
    }

    /// A text line (protocol 0 arguments), without its newline.
    fn line(&mut self) -> std::result::Result<String, String> {
        let mut out = Vec::new();
        loop {
            match self.u8()? {
                b'\n' => return Ok(String::from_utf8_lossy(&out).into_owned()),
                c => out.push(c),
            }
            if out.len() > 1 << 20 {
                return Err("text line over 1 MiB".into());
            }
        }
    }
}

fn le_int(bytes: &[u8]) -> Value {
    if bytes.is_empty() {
        return Value::Int(0);
    }
    if bytes.len() > 16 {
        return Value::Opaque;
    }
    let negative = bytes[bytes.len() - 1] & 0x80 != 0;
    let mut buf = [if negative { 0xFF } else { 0 }; 16];
    buf[..bytes.len()].copy_from_slice(bytes);
    Value::Int(i128::from_le_bytes(buf))
}

/// Undoes Python's `repr` quoting of a protocol-0 STRING argument (enough for keys).
fn unquote(s: &str) -> String {
    let s = s.trim();
    let inner = if s.len() >= 2
        && (s.starts_with('\'') && s.ends_with('\'') || s.starts_with('"') && s.ends_with('"'))
    {
        &s[1..s.len() - 1]
    } else {
        s
    };
    unescape(inner)
}

fn unescape(s: &str) -> String {
    let mut out = String::new();
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c != '\\' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('n') => out.push('\n'),
            Some('t') => out.push('\t'),
            Some('r') => out.push('\r'),
            Some('x') => {
                let h: String = chars.by_ref().take(2).collect();
                out.extend(u32::from_str_radix(&h, 16).ok().and_then(char::from_u32));
            }
            Some('u') => {
                let h: String = chars.by_ref().take(4).collect();
                out.extend(u32::from_str_radix(&h, 16).ok().and_then(char::from_u32));
            }
            Some(other) => out.push(other),
            None => out.push('\\'),
        }
    }
    out
}

struct Unpickler<'p> {
    stack: Vec<Value>,
    memo: HashMap<u64, Value>,
    persistent: Persistent<'p>,
}

impl<'p> Unpickler<'p> {
    fn pop(&mut self) -> std::result::Result<Value, String> {
        self.stack
            .pop()
            .ok_or_else(|| "stack underflow".to_string())
    }

    fn top(&mut self) -> std::result::Result<&mut Value, String> {
        self.stack
            .last_mut()
            .ok_or_else(|| "stack underflow".to_string())
    }

    /// Everything above the topmost mark, which is removed.
    fn pop_mark(&mut self) -> std::result::Result<Vec<Value>, String> {
        let at = self
            .stack
            .iter()
            .rposition(|v| matches!(v, Value::Mark))
            .ok_or("no mark on the stack")?;
        let items = self.stack.split_off(at + 1);
        self.stack.pop();
        Ok(items)
    }

    fn memo_get(&self, key: u64) -> std::result::Result<Value, String> {
        self.memo
            .get(&key)
            .cloned()
            .ok_or_else(|| format!("memo key {key} unset"))
    }

    fn memo_put(&mut self, key: u64) -> std::result::Result<(), String> {
        let v = self.stack.last().cloned().ok_or("stack underflow")?;
        self.memo.insert(key, v);
        Ok(())
    }

    fn set_items(&mut self, items: Vec<Value>) -> std::result::Result<(), String> {
        if !items.len().is_multiple_of(2) {
            return Err("odd number of dict items".into());
        }
        let mut pairs = Vec::with_capacity(items.len() / 2);
        let mut it = items.into_iter();
        while let (Some(k), Some(v)) = (it.next(), it.next()) {
            pairs.push((k, v));
        }
        match self.top()? {
            Value::Dict(d) => d.borrow_mut().extend(pairs),
            Value::Object(o) => o.borrow_mut().items.extend(pairs),
            other => return Err(format!("SETITEMS on a {}", other.kind())),
        }
        Ok(())
    }

    fn append(&mut self, items: Vec<Value>) -> std::result::Result<(), String> {
        match self.top()? {
            Value::List(l) => l.borrow_mut().extend(items),
            // A list subclass (or a set being built): nothing we need.
            Value::Object(_) | Value::Opaque => {}
            other => return Err(format!("APPENDS on a {}", other.kind())),
        }
        Ok(())
    }

    fn run<R: Read>(&mut self, input: &mut Input<R>) -> std::result::Result<Value, String> {
        loop {
            let at = input.pos;
            let op = input.u8()?;
            self.step(op, input)
                .map_err(|e| format!("pickle opcode 0x{op:02x} at byte {at}: {e}"))?;
            if op == b'.' {
                let v = self.pop()?;
                return Ok(v);
            }
        }
    }

    fn step<R: Read>(&mut self, op: u8, input: &mut Input<R>) -> std::result::Result<(), String> {
        match op {
            0x80 => {
                let proto = input.u8()?;
                if proto > 5 {
                    return Err(format!("pickle protocol {proto} is unknown"));
                }
            }
            0x95 => {
                input.u64()?; // FRAME: a length hint
            }
            b'.' => {}
            b'(' => self.stack.push(Value::Mark),
            b'0' => {
                self.pop()?;
            }
            b'1' => {
                self.pop_mark()?;
            }
            b'2' => {
                let v = self.top()?.clone();
                self.stack.push(v);
            }
            b'N' => self.stack.push(Value::None),
            0x88 => self.stack.push(Value::Bool(true)),
            0x89 => self.stack.push(Value::Bool(false)),
            b'I' => {
                let l = input.line()?;
                let v = match l.trim() {
                    "00" => Value::Bool(false),
                    "01" => Value::Bool(true),
                    t => Value::Int(t.parse().map_err(|_| format!("bad INT {t:?}"))?),
                };
                self.stack.push(v);
            }
            b'L' => {
                let l = input.line()?;
                let t = l.trim().trim_end_matches('L');
                self.stack
                    .push(t.parse().map(Value::Int).unwrap_or(Value::Opaque));
            }
            b'J' => {
                let v = i32::from_le_bytes(input.array()?);
                self.stack.push(Value::Int(v as i128));
            }
            b'K' => {
                let v = input.u8()?;
                self.stack.push(Value::Int(v as i128));
            }
            b'M' => {
                let v = u16::from_le_bytes(input.array()?);
                self.stack.push(Value::Int(v as i128));
            }
            0x8a => {
                let n = input.u8()? as u64;
                let b = input.bytes(n)?;
                self.stack.push(le_int(&b));
            }
            0x8b => {
                let n = input.u32()? as u64;
                let b = input.bytes(n)?;
                self.stack.push(le_int(&b));
            }
            b'F' => {
                let l = input.line()?;
                l.trim()
                    .parse::<f64>()
                    .map_err(|_| format!("bad FLOAT {l:?}"))?;
                self.stack.push(Value::Float);
            }
            b'G' => {
                input.array::<8>()?;
                self.stack.push(Value::Float);
            }
            // Strings: py3 str, py2 str (bytes, read as text: they are keys), bytes.
            b'X' | 0x8c | 0x8d | b'T' | b'U' => {
                let n = match op {
                    b'X' | b'T' => input.u32()? as u64,
                    0x8d => input.u64()?,
                    _ => input.u8()? as u64,
                };
                let b = input.bytes(n)?;
                let s = match String::from_utf8(b) {
                    Ok(s) => s,
                    // py2 byte strings are latin-1 as far as Python 3 is concerned.
                    Err(e) => e.into_bytes().iter().map(|&c| c as char).collect(),
                };
                self.stack.push(Value::Str(s.into()));
            }
            b'S' => {
                let l = input.line()?;
                self.stack.push(Value::Str(unquote(&l).into()));
            }
            b'V' => {
                let l = input.line()?;
                self.stack.push(Value::Str(unescape(&l).into()));
            }
            b'B' | b'C' | 0x8e | 0x96 => {
                let n = match op {
                    b'B' => input.u32()? as u64,
                    b'C' => input.u8()? as u64,
                    _ => input.u64()?,
                };
                input.bytes(n)?;
                self.stack.push(Value::Bytes);
            }
            0x98 => {} // READONLY_BUFFER
            0x97 => return Err("out-of-band buffers are not supported".into()),
            b')' => self.stack.push(Value::Tuple(Rc::new([]))),
            b't' => {
                let items = self.pop_mark()?;
                self.stack.push(Value::Tuple(items.into()));
            }
            0x85..=0x87 => {
                let n = (op - 0x84) as usize;
                if self.stack.len() < n {
                    return Err("stack underflow".into());
                }
                let items = self.stack.split_off(self.stack.len() - n);
                self.stack.push(Value::Tuple(items.into()));
            }
            b']' => self.stack.push(Value::List(Default::default())),
            b'l' => {
                let items = self.pop_mark()?;
                self.stack.push(Value::List(Rc::new(RefCell::new(items))));
            }
            b'a' => {
                let v = self.pop()?;
                self.append(vec![v])?;
            }
            b'e' => {
                let items = self.pop_mark()?;
                self.append(items)?;
            }
            b'}' => self.stack.push(Value::Dict(Default::default())),
            b'd' => {
                let items = self.pop_mark()?;
                self.stack.push(Value::Dict(Default::default()));
                self.set_items(items)?;
            }
            b's' => {
                let v = self.pop()?;
                let k = self.pop()?;
                self.set_items(vec![k, v])?;
            }
            b'u' => {
                let items = self.pop_mark()?;
                self.set_items(items)?;
            }
            0x8f => self.stack.push(Value::Opaque), // EMPTY_SET
            0x90 => {
                self.pop_mark()?; // ADDITEMS
            }
            0x91 => {
                self.pop_mark()?;
                self.stack.push(Value::Opaque); // FROZENSET
            }
            b'g' => {
                let l = input.line()?;
                let k = l.trim().parse().map_err(|_| format!("bad GET {l:?}"))?;
                let v = self.memo_get(k)?;
                self.stack.push(v);
            }
            b'h' => {
                let k = input.u8()? as u64;
                let v = self.memo_get(k)?;
                self.stack.push(v);
            }
            b'j' => {
                let k = input.u32()? as u64;
                let v = self.memo_get(k)?;
                self.stack.push(v);
            }
            b'p' => {
                let l = input.line()?;
                let k = l.trim().parse().map_err(|_| format!("bad PUT {l:?}"))?;
                self.memo_put(k)?;
            }
            b'q' => {
                let k = input.u8()? as u64;
                self.memo_put(k)?;
            }
            b'r' => {
                let k = input.u32()? as u64;
                self.memo_put(k)?;
            }
            0x94 => {
                let k = self.memo.len() as u64;
                self.memo_put(k)?;
            }
            b'c' => {
                let module = input.line()?;
                let name = input.line()?;
                self.stack.push(Value::Global(Rc::new((module, name))));
            }
            0x93 => {
                let name = self.pop()?;
                let module = self.pop()?;
                match (module.as_str(), name.as_str()) {
                    (Some(m), Some(n)) => self
                        .stack
                        .push(Value::Global(Rc::new((m.to_string(), n.to_string())))),
                    _ => return Err("STACK_GLOBAL of non-strings".into()),
                }
            }
            0x82..=0x84 => return Err("extension registry codes are not supported".into()),
            b'R' | 0x81 => {
                let args = self.pop()?;
                let func = self.pop()?;
                let v = call(func, args)?;
                self.stack.push(v);
            }
            0x92 => {
                let _kwargs = self.pop()?;
                let args = self.pop()?;
                let func = self.pop()?;
                let v = call(func, args)?;
                self.stack.push(v);
            }
            b'i' => {
                let module = input.line()?;
                let name = input.line()?;
                let args = self.pop_mark()?;
                let v = call(
                    Value::Global(Rc::new((module, name))),
                    Value::Tuple(args.into()),
                )?;
                self.stack.push(v);
            }
            b'o' => {
                let mut items = self.pop_mark()?;
                if items.is_empty() {
                    return Err("OBJ without a class".into());
                }
                let func = items.remove(0);
                let v = call(func, Value::Tuple(items.into()))?;
                self.stack.push(v);
            }
            b'b' => {
                // BUILD sets an instance's state: nothing we read (OrderedDict's `_metadata`,
                // a Parameter's attributes, an unknown object's fields).
                self.pop()?;
                self.top()?;
            }
            b'P' => {
                let l = input.line()?;
                let v = (self.persistent)(Value::Str(l.into()))?;
                self.stack.push(v);
            }
            b'Q' => {
                let pid = self.pop()?;
                let v = (self.persistent)(pid)?;
                self.stack.push(v);
            }
            other => return Err(format!("unknown pickle opcode 0x{other:02x}")),
        }
        Ok(())
    }
}

/// A call the pickle asks for (REDUCE, NEWOBJ, INST, OBJ). Only the calls that make dicts and
/// tensors mean anything; every other one becomes an inert object.
fn call(func: Value, args: Value) -> std::result::Result<Value, String> {
    let Value::Global(g) = &func else {
        return Ok(Value::Object(Default::default()));
    };
    let (module, name) = (g.0.as_str(), g.1.as_str());
    let args = args.items().unwrap_or_default();
    match (module, name) {
        ("collections", "OrderedDict") | ("builtins" | "__builtin__", "dict") => {
            // An OrderedDict from an iterable of pairs (as Python 2 pickled them).
            let mut pairs = Vec::new();
            if let Some(items) = args.first().and_then(Value::items) {
                for pair in items {
                    if let Some([k, v]) = pair.items().as_deref() {
                        pairs.push((k.clone(), v.clone()));
                    }
                }
            }
            Ok(Value::Dict(Rc::new(RefCell::new(pairs))))
        }
        ("torch._utils", "_rebuild_tensor" | "_rebuild_tensor_v2" | "_rebuild_tensor_v3") => {
            rebuild_tensor(name, &args).map(|t| Value::Tensor(Rc::new(t)))
        }
        ("torch._utils", "_rebuild_parameter" | "_rebuild_parameter_with_state") => {
            match args.first() {
                Some(t @ Value::Tensor(_)) => Ok(t.clone()),
                _ => Err(format!("{name} of something else than a tensor")),
            }
        }
        _ => Ok(Value::Object(Default::default())),
    }
}

fn rebuild_tensor(name: &str, args: &[Value]) -> std::result::Result<TensorInfo, String> {
    let bad = || format!("{name} with unexpected arguments");
    let Some(Value::Storage(storage)) = args.first() else {
        return Err(bad());
    };
    let offset = args.get(1).and_then(Value::as_usize).ok_or_else(bad)?;
    let shape = args.get(2).and_then(Value::usizes).ok_or_else(bad)?;
    let stride = args.get(3).and_then(Value::usizes).ok_or_else(bad)?;
    if shape.len() != stride.len() {
        return Err(bad());
    }
    // v3: (storage, offset, size, stride, requires_grad, hooks, dtype, ...).
    let dtype = match (name, args.get(6)) {
        ("_rebuild_tensor_v3", Some(Value::Global(g))) => Some(
            Elem::from_dtype_name(&g.1)
                .ok_or_else(|| format!("unsupported tensor dtype {}.{}", g.0, g.1))?,
        ),
        _ => None,
    };
    let elem = storage
        .elem
        .or(dtype)
        .ok_or_else(|| format!("{name} of an untyped storage without a dtype"))?;
    if let (Some(d), Some(s)) = (dtype, storage.elem) {
        if d != s {
            return Err(format!("tensor of dtype {d:?} over a {s:?} storage"));
        }
    }
    Ok(TensorInfo {
        storage: storage.index,
        elem,
        offset: storage.offset + offset,
        shape,
        stride,
    })
}

// ---------------------------------------------------------------------------------------------
// Storages

/// A storage as the persistent ids declare it.
struct Declared {
    key: String,
    /// `None` for `UntypedStorage` (bytes).
    elem: Option<Elem>,
    numel: u64,
}

/// Collects the storages that the persistent ids of the object pickle name.
#[derive(Default)]
struct Storages {
    declared: Vec<Declared>,
    by_key: HashMap<String, usize>,
}

impl Storages {
    fn persistent_load(&mut self, pid: Value) -> std::result::Result<Value, String> {
        let items = pid
            .items()
            .ok_or_else(|| format!("persistent id is a {}, not a tuple", pid.kind()))?;
        match items.first().and_then(Value::as_str) {
            Some("storage") => {}
            Some(other) => {
                return Err(format!(
                    "persistent id of type {other:?} (only tensors can be read; is this a \
                     whole pickled model rather than a state dict?)"
                ))
            }
            None => return Err("persistent id without a type".into()),
        }
        let bad = || "malformed storage persistent id".to_string();
        let Some(Value::Global(ty)) = items.get(1) else {
            return Err(bad());
        };
        let elem = match ty.1.as_str() {
            "UntypedStorage" => None,
            n => Some(
                Elem::from_storage_type(n)
                    .ok_or_else(|| format!("unsupported storage type {}.{}", ty.0, ty.1))?,
            ),
        };
        let key = match items.get(2) {
            Some(Value::Str(s)) => s.to_string(),
            Some(Value::Int(i)) => i.to_string(),
            _ => return Err(bad()),
        };
        let numel = items.get(4).and_then(Value::as_int).ok_or_else(bad)?;
        let numel = u64::try_from(numel).map_err(|_| bad())?;
        let index = match self.by_key.get(&key) {
            Some(&i) => {
                if self.declared[i].elem != elem {
                    return Err(format!("storage {key} is declared with two element types"));
                }
                i
            }
            None => {
                self.declared.push(Declared {
                    key: key.clone(),
                    elem,
                    numel,
                });
                self.by_key.insert(key, self.declared.len() - 1);
                self.declared.len() - 1
            }
        };
        // Legacy storage views: (view_key, offset, size), offsets in elements.
        let offset = match items.get(5) {
            None | Some(Value::None) => 0,
            Some(view) => view
                .items()
                .and_then(|v| v.get(1).and_then(Value::as_usize))
                .ok_or_else(bad)?,
        };
        Ok(Value::Storage(StorageRef {
            index,
            elem,
            offset,
        }))
    }
}

/// Where a storage's bytes are.
#[derive(Debug, Clone)]
enum Location {
    /// `len` bytes from file offset `at`.
    Raw { at: u64, len: u64 },
    /// A deflated zip entry: `compressed` bytes from `at`, `len` once inflated.
    Deflated { at: u64, compressed: u64, len: u64 },
}

impl Location {
    fn len(&self) -> u64 {
        match self {
            Self::Raw { len, .. } | Self::Deflated { len, .. } => *len,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The zip container

const LOCAL: [u8; 4] = *b"PK\x03\x04";
const CENTRAL: [u8; 4] = *b"PK\x01\x02";
const EOCD: [u8; 4] = *b"PK\x05\x06";
const EOCD64: [u8; 4] = *b"PK\x06\x06";
const LOCATOR64: [u8; 4] = *b"PK\x06\x07";

#[derive(Debug, Clone)]
struct ZipEntry {
    name: String,
    method: u16,
    compressed: u64,
    size: u64,
    header: u64,
}

fn read_at(file: &File, at: u64, len: usize) -> std::result::Result<Vec<u8>, String> {
    let mut buf = vec![0; len];
    file.read_exact_at(&mut buf, at)
        .map_err(|e| format!("cannot read {len} bytes at byte {at}: {e}"))?;
    Ok(buf)
}

fn le16(b: &[u8], i: usize) -> u64 {
    u16::from_le_bytes([b[i], b[i + 1]]) as u64
}

fn le32(b: &[u8], i: usize) -> u64 {
    u32::from_le_bytes(b[i..i + 4].try_into().unwrap()) as u64
}

fn le64(b: &[u8], i: usize) -> u64 {
    u64::from_le_bytes(b[i..i + 8].try_into().unwrap())
}

/// The central directory of a zip archive of `len` bytes.
fn zip_entries(file: &File, len: u64) -> std::result::Result<Vec<ZipEntry>, String> {
    // The end record plus the largest possible comment.
    let tail_len = len.min(22 + 0xFFFF);
    let tail_start = len - tail_len;
    let tail = read_at(file, tail_start, tail_len as usize)?;
    let eocd = (0..tail.len().saturating_sub(21))
        .rev()
        .find(|&i| tail[i..i + 4] == EOCD)
        .ok_or("zip archive without an end-of-central-directory record (truncated?)")?;
    let rec = &tail[eocd..eocd + 22];
    let (mut count, mut cd_size, mut cd_at) = (le16(rec, 10), le32(rec, 12), le32(rec, 16));
    // A zip64 end record holds the values that the classic record has saturated (torch writes
    // one into every archive, most often redundant).
    let eocd_at = tail_start + eocd as u64;
    if eocd_at >= 20 {
        let loc = read_at(file, eocd_at - 20, 20)?;
        if loc[..4] == LOCATOR64 {
            let at = le64(&loc, 8);
            let rec64 = (at.checked_add(56).is_some_and(|end| end <= len))
                .then(|| read_at(file, at, 56))
                .transpose()?
                .filter(|r| r[..4] == EOCD64)
                .ok_or("zip64 locator pointing at no zip64 end record")?;
            if count == 0xFFFF {
                count = le64(&rec64, 32);
            }
            if cd_size == 0xFFFF_FFFF {
                cd_size = le64(&rec64, 40);
            }
            if cd_at == 0xFFFF_FFFF {
                cd_at = le64(&rec64, 48);
            }
        }
    }
    if cd_at.checked_add(cd_size).is_none_or(|end| end > len) {
        return Err(format!(
            "zip central directory ({cd_size} bytes at {cd_at}) lies past the end of the \
             file ({len} bytes): truncated?"
        ));
    }
    let cd = read_at(file, cd_at, cd_size as usize)?;
    let mut entries = Vec::with_capacity(count.min(1 << 20) as usize);
    let mut p = 0usize;
    for _ in 0..count {
        let bad = || "damaged zip central directory".to_string();
        let h = cd.get(p..p + 46).ok_or_else(bad)?;
        if h[..4] != CENTRAL {
            return Err(bad());
        }
        let flags = le16(h, 8);
        let method = le16(h, 10) as u16;
        let (mut compressed, mut size) = (le32(h, 20), le32(h, 24));
        let (n, m, k) = (
            le16(h, 28) as usize,
            le16(h, 30) as usize,
            le16(h, 32) as usize,
        );
        let mut header = le32(h, 42);
        let name = cd.get(p + 46..p + 46 + n).ok_or_else(bad)?;
        let name = String::from_utf8_lossy(name).into_owned();
        let mut extra = cd.get(p + 46 + n..p + 46 + n + m).ok_or_else(bad)?;
        while extra.len() >= 4 {
            let (id, l) = (le16(extra, 0), le16(extra, 2) as usize);
            let body = extra.get(4..4 + l).ok_or_else(bad)?;
            if id == 1 {
                let mut q = 0;
                for field in [&mut size, &mut compressed, &mut header] {
                    if *field == 0xFFFF_FFFF {
                        *field = body.get(q..q + 8).map(|b| le64(b, 0)).ok_or_else(bad)?;
                        q += 8;
                    }
                }
            }
            extra = &extra[4 + l..];
        }
        if flags & 1 != 0 {
            return Err(format!("zip entry {name} is encrypted"));
        }
        entries.push(ZipEntry {
            name,
            method,
            compressed,
            size,
            header,
        });
        p += 46 + n + m + k;
    }
    Ok(entries)
}

/// Where an entry's data lies.
fn zip_location(file: &File, len: u64, e: &ZipEntry) -> std::result::Result<Location, String> {
    let h = read_at(file, e.header, 30).map_err(|_| format!("zip entry {}: truncated", e.name))?;
    if h[..4] != LOCAL {
        return Err(format!("zip entry {}: no local header", e.name));
    }
    let at = e.header + 30 + le16(&h, 26) + le16(&h, 28);
    if at.checked_add(e.compressed).is_none_or(|end| end > len) {
        return Err(format!(
            "zip entry {} ({} bytes at byte {at}) lies past the end of the file ({len} bytes): \
             truncated?",
            e.name, e.compressed
        ));
    }
    match e.method {
        0 => Ok(Location::Raw { at, len: e.size }),
        8 => Ok(Location::Deflated {
            at,
            compressed: e.compressed,
            len: e.size,
        }),
        m => Err(format!(
            "zip entry {}: unsupported compression method {m}",
            e.name
        )),
    }
}

fn read_location(
    file: &File,
    loc: &Location,
    start: u64,
    len: usize,
) -> std::result::Result<Vec<u8>, String> {
    match *loc {
        Location::Raw { at, .. } => read_at(file, at + start, len),
        Location::Deflated { at, compressed, .. } => {
            let raw = read_at(file, at, compressed as usize)?;
            let mut out = Vec::new();
            flate2::read::DeflateDecoder::new(&raw[..])
                .take(start + len as u64)
                .read_to_end(&mut out)
                .map_err(|e| format!("cannot inflate: {e}"))?;
            if out.len() < start as usize + len {
                return Err("deflated entry shorter than declared".into());
            }
            out.drain(..start as usize);
            Ok(out)
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The reader

/// The container a checkpoint was found in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// torch ≥ 1.6: a zip archive.
    Zip,
    /// torch < 1.6 (or `_use_new_zipfile_serialization=False`): a sequence of pickles.
    Legacy,
}

/// An opened torch checkpoint: its tensors by name, read from the file on demand.
pub struct TorchFile {
    path: PathBuf,
    file: File,
    format: Format,
    storages: Vec<Location>,
    tensors: HashMap<String, TensorInfo>,
}

impl std::fmt::Debug for TorchFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TorchFile")
            .field("path", &self.path)
            .field("format", &self.format)
            .field("tensors", &self.tensors.len())
            .finish()
    }
}

const LEGACY_MAGIC: i128 = 0x1950a86a20f9469cfc6c;
const LEGACY_PROTOCOL: i128 = 1001;
/// Where the state dict is looked for, when the top level has no tensors.
const NESTS: [&str; 2] = ["state_dict", "model"];
const NEST_DEPTH: usize = 4;

impl TorchFile {
    /// Opens a checkpoint: the top-level dict if it holds tensors, else the first dict with
    /// tensors under `state_dict` or `model` (several levels deep); `module.` is dropped when
    /// every key has it.
    pub fn open(path: &Path) -> Result<Self> {
        Self::open_impl(path, None)
    }

    /// Opens the dict of tensors at `keys` (e.g. `["depth_model"]`) from the top level.
    pub fn open_under(path: &Path, keys: &[&str]) -> Result<Self> {
        Self::open_impl(path, Some(keys))
    }

    fn open_impl(path: &Path, under: Option<&[&str]>) -> Result<Self> {
        let err = |msg: String| Error::Weights(format!("{}: {msg}", path.display()));
        let file = File::open(path).map_err(|source| Error::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let len = file
            .metadata()
            .map_err(|source| Error::Io {
                path: path.to_path_buf(),
                source,
            })?
            .len();
        let head = read_at(&file, 0, len.min(512) as usize).map_err(err)?;
        let (format, root, storages) = if head.starts_with(&LOCAL) || head.starts_with(&EOCD) {
            let (root, storages) =
                read_zip(&file, len).map_err(|e| err(format!("torch zip file: {e}")))?;
            (Format::Zip, root, storages)
        } else if head.first() == Some(&0x80) {
            let (root, storages) =
                read_legacy(&file, len).map_err(|e| err(format!("legacy torch file: {e}")))?;
            (Format::Legacy, root, storages)
        } else if head.get(257..262) == Some(b"ustar") {
            return Err(err(
                "a tar archive: torch's tar format (torch < 0.1.10) is not supported".into(),
            ));
        } else if len == 0 {
            return Err(err("empty file, not a torch checkpoint".into()));
        } else {
            return Err(err(
                "not a torch checkpoint (neither a zip archive nor a pickle)".into(),
            ));
        };
        let tensors = resolve(&root, under).map_err(err)?;
        for (key, t) in &tensors {
            check_bounds(t, storages[t.storage].len())
                .map_err(|e| err(format!("tensor `{key}`: {e}")))?;
        }
        Ok(Self {
            path: path.to_path_buf(),
            file,
            format,
            storages,
            tensors,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn format(&self) -> Format {
        self.format
    }

    /// The tensor names, sorted.
    pub fn keys(&self) -> Vec<String> {
        let mut keys: Vec<String> = self.tensors.keys().cloned().collect();
        keys.sort();
        keys
    }

    pub fn contains(&self, key: &str) -> bool {
        self.tensors.contains_key(key)
    }

    pub fn shape(&self, key: &str) -> Option<&[usize]> {
        self.tensors.get(key).map(|t| t.shape.as_slice())
    }

    /// The dtype the tensor is read as (i8 storages as i16, bool as u8).
    pub fn dtype(&self, key: &str) -> Option<DType> {
        self.tensors.get(key).map(|t| t.elem.dtype())
    }

    /// Reads one tensor (contiguous, on the CPU), or `None` if the file has no such key.
    pub fn get(&self, key: &str) -> Result<Option<Tensor>> {
        let Some(t) = self.tensors.get(key) else {
            return Ok(None);
        };
        self.read(t)
            .map(Some)
            .map_err(|e| Error::Weights(format!("{}: tensor `{key}`: {e}", self.path.display())))
    }

    fn read(&self, t: &TensorInfo) -> std::result::Result<Tensor, String> {
        let es = t.elem.size();
        let numel: usize = t.shape.iter().product();
        if numel == 0 {
            return Tensor::zeros(t.shape.as_slice(), t.elem.dtype(), &Device::Cpu)
                .map_err(|e| e.to_string());
        }
        let last = t.offset
            + t.shape
                .iter()
                .zip(&t.stride)
                .map(|(&n, &s)| (n - 1) * s)
                .sum::<usize>();
        let span = read_location(
            &self.file,
            &self.storages[t.storage],
            (t.offset * es) as u64,
            (last + 1 - t.offset) * es,
        )?;
        let bytes = if is_contiguous(&t.shape, &t.stride) {
            span
        } else {
            gather(&span, es, &t.shape, &t.stride)
        };
        let bytes = match t.elem {
            Elem::I8 => bytes
                .iter()
                .flat_map(|&b| (b as i8 as i16).to_le_bytes())
                .collect(),
            _ => bytes,
        };
        Tensor::from_raw_buffer(&bytes, t.elem.dtype(), &t.shape, &Device::Cpu)
            .map_err(|e| e.to_string())
    }
}

fn is_contiguous(shape: &[usize], stride: &[usize]) -> bool {
    let mut expected = 1;
    for (&n, &s) in shape.iter().zip(stride).rev() {
        if n != 1 && s != expected {
            return false;
        }
        expected *= n;
    }
    true
}

/// The elements of a strided view (strides relative to `span`'s start) in row-major order.
fn gather(span: &[u8], es: usize, shape: &[usize], stride: &[usize]) -> Vec<u8> {
    let numel: usize = shape.iter().product();
    let mut out = Vec::with_capacity(numel * es);
    let mut index = vec![0usize; shape.len()];
    for _ in 0..numel {
        let at: usize = index.iter().zip(stride).map(|(i, s)| i * s).sum::<usize>() * es;
        out.extend_from_slice(&span[at..at + es]);
        for d in (0..shape.len()).rev() {
            index[d] += 1;
            if index[d] < shape[d] {
                break;
            }
            index[d] = 0;
        }
    }
    out
}

fn check_bounds(t: &TensorInfo, storage_bytes: u64) -> std::result::Result<(), String> {
    if t.shape.contains(&0) {
        return Ok(());
    }
    let last = t
        .shape
        .iter()
        .zip(&t.stride)
        .try_fold(t.offset as u128, |acc, (&n, &s)| {
            acc.checked_add((n as u128 - 1) * s as u128)
        });
    let end = last.map(|l| (l + 1) * t.elem.size() as u128);
    match end {
        Some(end) if end <= storage_bytes as u128 => Ok(()),
        _ => Err(format!(
            "view (offset {}, shape {:?}, strides {:?}) reaches past its storage of {} bytes",
            t.offset, t.shape, t.stride, storage_bytes
        )),
    }
}

fn read_zip(file: &File, len: u64) -> std::result::Result<(Value, Vec<Location>), String> {
    let entries = zip_entries(file, len)?;
    let pkl = entries
        .iter()
        .filter(|e| e.name.ends_with("data.pkl"))
        .min_by_key(|e| e.name.matches('/').count())
        .ok_or("a zip archive without data.pkl, not a torch checkpoint")?;
    let prefix = pkl.name.strip_suffix("data.pkl").unwrap().to_string();
    let by_name: HashMap<&str, &ZipEntry> = entries.iter().map(|e| (e.name.as_str(), e)).collect();
    if let Some(e) = by_name.get(format!("{prefix}byteorder").as_str()) {
        let loc = zip_location(file, len, e)?;
        let order = read_location(file, &loc, 0, loc.len().min(16) as usize)?;
        if order.trim_ascii() != b"little" {
            return Err(format!(
                "byte order {:?} is not supported",
                String::from_utf8_lossy(&order)
            ));
        }
    }
    let loc = zip_location(file, len, pkl)?;
    let data = read_location(file, &loc, 0, loc.len() as usize)?;
    let mut storages = Storages::default();
    let mut input = Input {
        r: &data[..],
        pos: 0,
        len: data.len() as u64,
    };
    let root = Unpickler {
        stack: Vec::new(),
        memo: HashMap::new(),
        persistent: &mut |pid| storages.persistent_load(pid),
    }
    .run(&mut input)
    .map_err(|e| format!("{}: {e}", pkl.name))?;
    let mut locations = Vec::with_capacity(storages.declared.len());
    for d in &storages.declared {
        let name = format!("{prefix}data/{}", d.key);
        let e = by_name
            .get(name.as_str())
            .ok_or_else(|| format!("storage {} has no entry {name}", d.key))?;
        let loc = zip_location(file, len, e)?;
        if let Some(elem) = d.elem {
            if d.numel.saturating_mul(elem.size() as u64) > loc.len() {
                return Err(format!(
                    "storage {} declares {} elements, its entry has {} bytes",
                    d.key,
                    d.numel,
                    loc.len()
                ));
            }
        }
        locations.push(loc);
    }
    Ok((root, locations))
}

fn read_legacy(file: &File, len: u64) -> std::result::Result<(Value, Vec<Location>), String> {
    let mut input = Input {
        r: BufReader::new(file),
        pos: 0,
        len,
    };
    let mut storages = Storages::default();
    let plain = |what: &str, input: &mut Input<BufReader<&File>>| {
        Unpickler {
            stack: Vec::new(),
            memo: HashMap::new(),
            persistent: &mut |_| Err("persistent id outside the object pickle".into()),
        }
        .run(input)
        .map_err(|e| format!("{what}: {e}"))
    };
    let magic = plain("magic number", &mut input)?;
    if magic.as_int() != Some(LEGACY_MAGIC) {
        return Err("a pickle without torch's magic number: not a torch checkpoint".into());
    }
    let version = plain("protocol version", &mut input)?;
    if version.as_int() != Some(LEGACY_PROTOCOL) {
        return Err(format!("unsupported protocol version {version:?}"));
    }
    let info = plain("sys info", &mut input)?;
    for (k, v) in info.dict_items().unwrap_or_default() {
        if k.as_str() == Some("little_endian") && matches!(v, Value::Bool(false)) {
            return Err("big-endian files are not supported".into());
        }
    }
    let root = Unpickler {
        stack: Vec::new(),
        memo: HashMap::new(),
        persistent: &mut |pid| storages.persistent_load(pid),
    }
    .run(&mut input)
    .map_err(|e| format!("object pickle: {e}"))?;
    let keys = plain("storage keys", &mut input)?;
    let keys = keys
        .items()
        .ok_or_else(|| format!("storage keys are a {}, not a list", keys.kind()))?;
    let mut locations: Vec<Option<Location>> = vec![None; storages.declared.len()];
    let mut at = input.pos;
    for key in keys {
        let key = match &key {
            Value::Str(s) => s.to_string(),
            Value::Int(i) => i.to_string(),
            other => return Err(format!("storage key is a {}", other.kind())),
        };
        let &index = storages
            .by_key
            .get(&key)
            .ok_or_else(|| format!("storage {key} is listed but no tensor uses it"))?;
        let d = &storages.declared[index];
        let elem = d
            .elem
            .ok_or_else(|| format!("storage {key}: untyped storages are not supported"))?;
        let head = read_at(file, at, 8)
            .map_err(|_| format!("storage {key}: truncated file (no header at byte {at})"))?;
        let numel = le64(&head, 0);
        let bytes = numel
            .checked_mul(elem.size() as u64)
            .ok_or_else(|| format!("storage {key}: absurd size {numel}"))?;
        if (at + 8).checked_add(bytes).is_none_or(|end| end > len) {
            return Err(format!(
                "storage {key} ({numel} elements at byte {}) lies past the end of the file \
                 ({len} bytes): truncated",
                at + 8
            ));
        }
        locations[index] = Some(Location::Raw {
            at: at + 8,
            len: bytes,
        });
        at += 8 + bytes;
    }
    let locations = locations
        .into_iter()
        .zip(&storages.declared)
        .map(|(l, d)| l.ok_or_else(|| format!("storage {} is not in the file", d.key)))
        .collect::<std::result::Result<_, _>>()?;
    Ok((root, locations))
}

/// The dict of tensors to read from the unpickled root.
fn resolve(
    root: &Value,
    under: Option<&[&str]>,
) -> std::result::Result<HashMap<String, TensorInfo>, String> {
    fn tensors_of(v: &Value) -> Vec<(String, TensorInfo)> {
        v.dict_items()
            .unwrap_or_default()
            .into_iter()
            .filter_map(|(k, v)| match (k, v) {
                (Value::Str(k), Value::Tensor(t)) => Some((k.to_string(), (*t).clone())),
                _ => None,
            })
            .collect()
    }
    fn get(v: &Value, key: &str) -> Option<Value> {
        v.dict_items()?
            .into_iter()
            .find(|(k, _)| k.as_str() == Some(key))
            .map(|(_, v)| v)
    }
    fn search(v: &Value, depth: usize) -> Option<Vec<(String, TensorInfo)>> {
        let own = tensors_of(v);
        if !own.is_empty() {
            return Some(own);
        }
        if depth == 0 {
            return None;
        }
        NESTS
            .iter()
            .filter_map(|k| get(v, k))
            .find_map(|inner| search(&inner, depth - 1))
    }
    let describe = |v: &Value| match v.dict_items() {
        Some(items) => {
            let keys: Vec<String> = items
                .iter()
                .take(12)
                .map(|(k, v)| match k.as_str() {
                    Some(k) => format!("{k:?} ({})", v.kind()),
                    None => format!("a {} key", k.kind()),
                })
                .collect();
            format!("a dict of {} entries: {}", items.len(), keys.join(", "))
        }
        None => format!("a {}", v.kind()),
    };
    let found = match under {
        Some(path) => {
            let mut v = root.clone();
            for (i, key) in path.iter().enumerate() {
                v = get(&v, key).ok_or_else(|| {
                    format!("no entry {:?} (in {})", path[..=i].join("."), describe(&v))
                })?;
            }
            let t = tensors_of(&v);
            if t.is_empty() {
                return Err(format!(
                    "no tensors under {:?} ({})",
                    path.join("."),
                    describe(&v)
                ));
            }
            t
        }
        None => search(root, NEST_DEPTH).ok_or_else(|| {
            format!(
                "no state dict found: no tensors at the top level nor under `state_dict` or \
                 `model` (the file holds {})",
                describe(root)
            )
        })?,
    };
    let strip = found.iter().all(|(k, _)| k.starts_with("module."));
    Ok(found
        .into_iter()
        .map(|(k, t)| match strip {
            true => (k["module.".len()..].to_string(), t),
            false => (k, t),
        })
        .collect())
}

// ---------------------------------------------------------------------------------------------
// The writer

/// f32 values and a shape, row-major.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorData {
    pub shape: Vec<usize>,
    pub values: Vec<f32>,
}

impl TensorData {
    pub fn new(shape: Vec<usize>, values: Vec<f32>) -> Self {
        Self { shape, values }
    }

    /// The values of a candle tensor (any dtype, any device), as f32.
    pub fn from_tensor(t: &Tensor) -> Result<Self> {
        let values = t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        Ok(Self::new(t.dims().to_vec(), values))
    }
}

/// The element type of the storages [`save`] writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum StorageDtype {
    #[default]
    F32,
    F16,
    BF16,
}

/// How [`save`] lays a file out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SaveOptions {
    pub format: Format,
    pub dtype: StorageDtype,
    /// Dict keys the state dict sits under, outermost first: `[]` for a plain state dict,
    /// `["state_dict"]`, `["model"]`, `["model", "state_dict"]`, ...
    pub nest: Vec<String>,
    /// Put before every key (`"module."` as a `DataParallel` model saves it).
    pub prefix: String,
}

impl Default for SaveOptions {
    fn default() -> Self {
        Self {
            format: Format::Zip,
            dtype: StorageDtype::F32,
            nest: Vec::new(),
            prefix: String::new(),
        }
    }
}

/// Protocol-2 pickle opcodes, as torch writes them.
#[derive(Default)]
struct Pickler {
    out: Vec<u8>,
}

impl Pickler {
    fn op(&mut self, op: u8) {
        self.out.push(op);
    }

    fn global(&mut self, module: &str, name: &str) {
        self.op(b'c');
        self.out.extend(format!("{module}\n{name}\n").bytes());
    }

    fn str(&mut self, s: &str) {
        self.op(b'X');
        self.out.extend((s.len() as u32).to_le_bytes());
        self.out.extend(s.bytes());
    }

    fn int(&mut self, v: i128) {
        if (0..256).contains(&v) {
            self.op(b'K');
            self.out.push(v as u8);
        } else if (0..65536).contains(&v) {
            self.op(b'M');
            self.out.extend((v as u16).to_le_bytes());
        } else if i32::try_from(v).is_ok() {
            self.op(b'J');
            self.out.extend((v as i32).to_le_bytes());
        } else {
            // LONG1: the shortest two's-complement little-endian form.
            let bytes = v.to_le_bytes();
            let mut n = 16;
            while n > 1 {
                let (last, prev) = (bytes[n - 1], bytes[n - 2]);
                if (last == 0 && prev & 0x80 == 0) || (last == 0xFF && prev & 0x80 != 0) {
                    n -= 1;
                } else {
                    break;
                }
            }
            self.op(0x8a);
            self.out.push(n as u8);
            self.out.extend(&bytes[..n]);
        }
    }

    fn ints(&mut self, v: &[usize]) {
        self.op(b'(');
        for &i in v {
            self.int(i as i128);
        }
        self.op(b't');
    }

    fn empty_ordered_dict(&mut self) {
        self.global("collections", "OrderedDict");
        self.op(b')');
        self.op(b'R');
    }
}

/// The object pickle of a state dict, nested as asked; storage `i` is tensor `i`'s.
fn object_pickle(
    tensors: &[(String, TensorData)],
    opts: &SaveOptions,
    storage_type: &str,
) -> Vec<u8> {
    let mut p = Pickler::default();
    p.op(0x80);
    p.op(2);
    for key in &opts.nest {
        p.op(b'}');
        p.str(key);
    }
    p.empty_ordered_dict();
    if !tensors.is_empty() {
        p.op(b'(');
        for (i, (name, data)) in tensors.iter().enumerate() {
            p.str(&format!("{}{name}", opts.prefix));
            p.global("torch._utils", "_rebuild_tensor_v2");
            p.op(b'(');
            // The persistent id of the storage.
            p.op(b'(');
            p.str("storage");
            p.global("torch", storage_type);
            p.str(&i.to_string());
            p.str("cpu");
            p.int(data.values.len() as i128);
            if opts.format == Format::Legacy {
                p.op(b'N'); // no view metadata
            }
            p.op(b't');
            p.op(b'Q');
            p.int(0);
            p.ints(&data.shape);
            let mut stride = vec![1usize; data.shape.len()];
            for d in (0..data.shape.len().saturating_sub(1)).rev() {
                stride[d] = stride[d + 1] * data.shape[d + 1];
            }
            p.ints(&stride);
            p.op(0x89); // requires_grad = False
            p.empty_ordered_dict(); // backward hooks
            p.op(b't');
            p.op(b'R');
        }
        p.op(b'u');
    }
    for _ in &opts.nest {
        p.op(b's');
    }
    p.op(b'.');
    p.out
}

fn storage_bytes(data: &TensorData, dtype: StorageDtype) -> Vec<u8> {
    match dtype {
        StorageDtype::F32 => data.values.iter().flat_map(|v| v.to_le_bytes()).collect(),
        StorageDtype::F16 => data
            .values
            .iter()
            .flat_map(|&v| f32_to_f16(v).to_le_bytes())
            .collect(),
        StorageDtype::BF16 => data
            .values
            .iter()
            .flat_map(|&v| f32_to_bf16(v).to_le_bytes())
            .collect(),
    }
}

/// f32 to bf16 bits, rounding to nearest even (NaN stays NaN).
fn f32_to_bf16(x: f32) -> u16 {
    let b = x.to_bits();
    if x.is_nan() {
        return ((b >> 16) as u16) | 0x40;
    }
    let round = 0x7FFF + ((b >> 16) & 1);
    (b.wrapping_add(round) >> 16) as u16
}

/// f32 to f16 bits, rounding to nearest even, through f16's subnormals; out of range is ±inf.
fn f32_to_f16(x: f32) -> u16 {
    let b = x.to_bits();
    let sign = ((b >> 16) & 0x8000) as u16;
    let exp = ((b >> 23) & 0xFF) as i32;
    let man = b & 0x7F_FFFF;
    if exp == 0xFF {
        let nan = if man != 0 {
            0x200 | (man >> 13) as u16
        } else {
            0
        };
        return sign | 0x7C00 | nan;
    }
    let e = exp - 127 + 15;
    if e >= 0x1F {
        return sign | 0x7C00;
    }
    let round = |m: u32, shift: u32| -> u32 {
        let (k, rem, half) = (m >> shift, m & ((1 << shift) - 1), 1 << (shift - 1));
        k + (rem > half || (rem == half && k & 1 == 1)) as u32
    };
    if e <= 0 {
        // Subnormal in f16: units of 2^-24.
        if e < -10 {
            return sign;
        }
        return sign | round(man | 0x80_0000, (14 - e) as u32) as u16;
    }
    // A carry out of the mantissa moves into the exponent, up to inf: both are right.
    sign | round(((e as u32) << 23) | man, 13) as u16
}

/// A zip archive of stored entries, data aligned to 64 bytes as torch aligns it.
#[derive(Default)]
struct ZipWriter {
    out: Vec<u8>,
    central: Vec<u8>,
    count: u64,
}

impl ZipWriter {
    fn add(&mut self, name: &str, data: &[u8]) {
        let header = self.out.len() as u32;
        let mut crc = flate2::Crc::new();
        crc.update(data);
        let crc = crc.sum();
        let unpadded = self.out.len() + 30 + name.len();
        let pad = match unpadded % 64 {
            0 => 0,
            r => {
                let mut pad = 64 - r;
                if pad < 4 {
                    pad += 64;
                }
                pad
            }
        };
        let fields = |buf: &mut Vec<u8>| {
            buf.extend(20u16.to_le_bytes()); // version needed
            buf.extend(0u16.to_le_bytes()); // flags
            buf.extend(0u16.to_le_bytes()); // stored
            buf.extend(0u16.to_le_bytes()); // time
            buf.extend(0x21u16.to_le_bytes()); // date: 1980-01-01
            buf.extend(crc.to_le_bytes());
            buf.extend((data.len() as u32).to_le_bytes());
            buf.extend((data.len() as u32).to_le_bytes());
            buf.extend((name.len() as u16).to_le_bytes());
        };
        self.out.extend(LOCAL);
        fields(&mut self.out);
        self.out.extend((pad as u16).to_le_bytes());
        self.out.extend(name.bytes());
        if pad > 0 {
            self.out.extend(0x4246u16.to_le_bytes()); // "FB", torch's padding field
            self.out.extend(((pad - 4) as u16).to_le_bytes());
            self.out.extend(std::iter::repeat_n(b'Z', pad - 4));
        }
        self.out.extend(data);
        self.central.extend(CENTRAL);
        self.central.extend(20u16.to_le_bytes()); // version made by
        fields(&mut self.central);
        self.central.extend([0u8; 12]); // extra, comment, disk, attributes
        self.central.extend(header.to_le_bytes());
        self.central.extend(name.bytes());
        self.count += 1;
    }

    fn finish(mut self) -> std::result::Result<Vec<u8>, String> {
        let cd_at = self.out.len();
        if cd_at + self.central.len() > u32::MAX as usize || self.count > 0xFFFE {
            return Err("over 4 GiB or 65535 entries: zip64 is not written".into());
        }
        self.out.extend(&self.central);
        self.out.extend(EOCD);
        self.out.extend([0u8; 4]);
        self.out.extend((self.count as u16).to_le_bytes());
        self.out.extend((self.count as u16).to_le_bytes());
        self.out.extend((self.central.len() as u32).to_le_bytes());
        self.out.extend((cd_at as u32).to_le_bytes());
        self.out.extend(0u16.to_le_bytes());
        Ok(self.out)
    }
}

/// Writes `tensors` as a torch checkpoint that `torch.load` (also with `weights_only=True`)
/// and [`TorchFile`] read; see the module documentation.
pub fn save(path: &Path, tensors: &[(String, TensorData)], opts: SaveOptions) -> Result<()> {
    let err = |msg: String| Error::Weights(format!("{}: {msg}", path.display()));
    for (name, data) in tensors {
        let n: usize = data.shape.iter().product();
        if n != data.values.len() {
            return Err(err(format!(
                "tensor `{name}`: shape {:?} holds {n} values, {} given",
                data.shape,
                data.values.len()
            )));
        }
    }
    let storage_type = match opts.dtype {
        StorageDtype::F32 => "FloatStorage",
        StorageDtype::F16 => "HalfStorage",
        StorageDtype::BF16 => "BFloat16Storage",
    };
    let pickle = object_pickle(tensors, &opts, storage_type);
    let bytes = match opts.format {
        Format::Zip => {
            let mut zip = ZipWriter::default();
            zip.add("archive/data.pkl", &pickle);
            zip.add("archive/byteorder", b"little");
            for (i, (_, data)) in tensors.iter().enumerate() {
                zip.add(
                    &format!("archive/data/{i}"),
                    &storage_bytes(data, opts.dtype),
                );
            }
            zip.add("archive/version", b"3\n");
            zip.finish().map_err(err)?
        }
        Format::Legacy => {
            let mut out = Vec::new();
            let mut p = Pickler::default();
            p.op(0x80);
            p.op(2);
            p.int(LEGACY_MAGIC);
            p.op(b'.');
            p.op(0x80);
            p.op(2);
            p.int(LEGACY_PROTOCOL);
            p.op(b'.');
            p.op(0x80);
            p.op(2);
            p.op(b'}');
            p.op(b'(');
            p.str("protocol_version");
            p.int(LEGACY_PROTOCOL);
            p.str("little_endian");
            p.op(0x88);
            p.str("type_sizes");
            p.op(b'}');
            p.op(b'(');
            for (k, v) in [("short", 2), ("int", 4), ("long", 4)] {
                p.str(k);
                p.int(v);
            }
            p.op(b'u');
            p.op(b'u');
            p.op(b'.');
            out.extend(p.out);
            out.extend(pickle);
            // Storage keys in torch's order (sorted as strings), data in that order.
            let mut keys: Vec<String> = (0..tensors.len()).map(|i| i.to_string()).collect();
            keys.sort();
            let mut p = Pickler::default();
            p.op(0x80);
            p.op(2);
            p.op(b']');
            if !keys.is_empty() {
                p.op(b'(');
                for k in &keys {
                    p.str(k);
                }
                p.op(b'e');
            }
            p.op(b'.');
            out.extend(p.out);
            for k in &keys {
                let data = &tensors[k.parse::<usize>().unwrap()].1;
                out.extend((data.values.len() as u64).to_le_bytes());
                out.extend(storage_bytes(data, opts.dtype));
            }
            out
        }
    };
    let mut f = File::create(path).map_err(|source| Error::Io {
        path: path.to_path_buf(),
        source,
    })?;
    f.write_all(&bytes).map_err(|source| Error::Io {
        path: path.to_path_buf(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp(name: &str) -> PathBuf {
        std::env::temp_dir().join(format!("torch-pickle-unit-{}-{name}", std::process::id()))
    }

    fn sample() -> Vec<(String, TensorData)> {
        vec![
            (
                "a".into(),
                TensorData::new(vec![2, 3], (0..6).map(|i| i as f32 * 0.5).collect()),
            ),
            ("b".into(), TensorData::new(vec![], vec![-2.0])),
        ]
    }

    fn values(f: &TorchFile, key: &str) -> Vec<f32> {
        f.get(key)
            .unwrap()
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap()
    }

    /// Appends a zip64 end record and locator before the classic end record, as torch does,
    /// optionally saturating the classic record's fields so that only zip64 has the values.
    fn with_zip64(zip: &[u8], saturate: bool) -> Vec<u8> {
        let eocd = zip.len() - 22;
        let rec = &zip[eocd..];
        let (count, cd_size, cd_at) = (le16(rec, 10), le32(rec, 12), le32(rec, 16));
        let mut out = zip[..eocd].to_vec();
        let at = out.len() as u64;
        out.extend(EOCD64);
        out.extend(44u64.to_le_bytes());
        out.extend([45u8, 0, 45, 0]);
        out.extend([0u8; 8]);
        out.extend(count.to_le_bytes());
        out.extend(count.to_le_bytes());
        out.extend(cd_size.to_le_bytes());
        out.extend(cd_at.to_le_bytes());
        out.extend(LOCATOR64);
        out.extend(0u32.to_le_bytes());
        out.extend(at.to_le_bytes());
        out.extend(1u32.to_le_bytes());
        let mut rec = rec.to_vec();
        if saturate {
            rec[8..12].copy_from_slice(&[0xFF; 4]);
            rec[12..20].copy_from_slice(&[0xFF; 8]);
        }
        out.extend(rec);
        out
    }

    #[test]
    fn zip64_end_records_redundant_or_needed() {
        let path = temp("plain.pth");
        save(&path, &sample(), SaveOptions::default()).unwrap();
        let zip = std::fs::read(&path).unwrap();
        for saturate in [false, true] {
            std::fs::write(&path, with_zip64(&zip, saturate)).unwrap();
            let f = TorchFile::open(&path).unwrap();
            assert_eq!(f.keys(), ["a", "b"]);
            assert_eq!(values(&f, "a"), [0.0, 0.5, 1.0, 1.5, 2.0, 2.5]);
            assert_eq!(values(&f, "b"), [-2.0]);
        }
        // A locator pointing at nothing is a damaged file.
        let mut bad = with_zip64(&zip, true);
        let n = bad.len();
        bad[n - 22 - 12] ^= 0x10;
        std::fs::write(&path, bad).unwrap();
        let e = TorchFile::open(&path).unwrap_err().to_string();
        assert!(e.contains("zip64"), "{e}");
        std::fs::remove_file(&path).unwrap();
    }

    #[test]
    fn views_are_gathered() {
        // A 3×4 storage read transposed from offset 1: rows of the view are columns 1..4.
        let storage: Vec<u8> = (0u8..12).collect();
        let span = &storage[1..];
        let got = gather(span, 1, &[3, 3], &[1, 4]);
        assert_eq!(got, [1, 5, 9, 2, 6, 10, 3, 7, 11]);
        assert!(is_contiguous(&[2, 1, 3], &[3, 99, 1]));
        assert!(!is_contiguous(&[2, 3], &[1, 2]));
    }

    /// Our f16/bf16 rounding is candle's (the `half` crate's), value for value, across normal,
    /// subnormal, halfway, overflowing and special values.
    #[test]
    fn half_conversions_match_candle() {
        let mut xs: Vec<f32> = vec![
            0.0,
            -0.0,
            1.0,
            -1.5,
            65504.0,
            65520.0,
            65519.99,
            1e6,
            -1e6,
            6.1e-5,
            5.96e-8,
            2.98e-8,
            2.99e-8,
            1e-9,
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::MAX,
            f32::MIN_POSITIVE,
        ];
        let mut state = 0x1234_5678u32;
        for _ in 0..20000 {
            state = state.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            xs.push(f32::from_bits(state));
        }
        xs.retain(|x| !x.is_nan());
        let data = TensorData::new(vec![xs.len()], xs.clone());
        let t = Tensor::new(xs.as_slice(), &Device::Cpu).unwrap();
        for (dtype, sd) in [
            (DType::F16, StorageDtype::F16),
            (DType::BF16, StorageDtype::BF16),
        ] {
            let ours = Tensor::from_raw_buffer(
                &storage_bytes(&data, sd),
                dtype,
                &[xs.len()],
                &Device::Cpu,
            )
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
            let theirs = t
                .to_dtype(dtype)
                .unwrap()
                .to_dtype(DType::F32)
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            for ((a, b), x) in ours.iter().zip(&theirs).zip(&xs) {
                assert_eq!(
                    a.to_bits(),
                    b.to_bits(),
                    "{dtype:?} of {x:e}: {a:e} vs {b:e}"
                );
            }
        }
    }

    /// A legacy file as Python 2 and torch 0.x wrote the OpenPose weights: byte-string keys
    /// (SHORT_BINSTRING), an OrderedDict reduced from a list of pairs, `_rebuild_tensor` (v1),
    /// storage views in the persistent ids.
    #[test]
    fn python2_era_legacy_file() {
        let short = |p: &mut Pickler, s: &str| {
            p.op(b'U');
            p.out.push(s.len() as u8);
            p.out.extend(s.bytes());
        };
        let mut p = Pickler::default();
        for v in [LEGACY_MAGIC, LEGACY_PROTOCOL] {
            p.op(0x80);
            p.op(2);
            p.int(v);
            p.op(b'.');
        }
        p.op(0x80);
        p.op(2);
        p.op(b'}');
        short(&mut p, "little_endian");
        p.op(0x88);
        p.op(b's');
        p.op(b'.');
        // OrderedDict([[key, tensor], ...]); storage "140" holds 10 floats, "77" 4 doubles.
        p.op(0x80);
        p.op(2);
        p.global("collections", "OrderedDict");
        p.op(b']');
        p.op(b'(');
        for (key, storage, ty, numel, view, offset, shape, stride) in [
            (
                "conv1_1.weight",
                "140",
                "FloatStorage",
                10,
                None,
                1,
                vec![2, 2],
                vec![1, 2],
            ),
            (
                "conv1_1.bias",
                "140",
                "FloatStorage",
                10,
                Some(4),
                1,
                vec![2],
                vec![1],
            ),
            ("scale", "77", "DoubleStorage", 4, None, 0, vec![4], vec![1]),
        ] {
            p.op(b']');
            p.op(b'(');
            short(&mut p, key);
            p.global("torch._utils", "_rebuild_tensor");
            p.op(b'(');
            p.op(b'(');
            short(&mut p, "storage");
            p.global("torch", ty);
            short(&mut p, storage);
            short(&mut p, "cpu");
            p.int(numel);
            match view {
                Some(at) => {
                    p.op(b'(');
                    short(&mut p, "9");
                    p.int(at);
                    p.int(3);
                    p.op(b't');
                }
                None => p.op(b'N'),
            }
            p.op(b't');
            p.op(b'Q');
            p.int(offset);
            p.ints(&shape);
            p.ints(&stride);
            p.op(b't');
            p.op(b'R');
            p.op(b'e');
        }
        p.op(b'e');
        p.op(0x85);
        p.op(b'R');
        p.op(b'.');
        // Storage keys, not in the order the tensors named them.
        p.op(0x80);
        p.op(2);
        p.op(b']');
        p.op(b'(');
        short(&mut p, "77");
        short(&mut p, "140");
        p.op(b'e');
        p.op(b'.');
        p.out.extend(4u64.to_le_bytes());
        for v in [0.25f64, -1.0, 3.5, 1e-300] {
            p.out.extend(v.to_le_bytes());
        }
        p.out.extend(10u64.to_le_bytes());
        for i in 0..10 {
            p.out.extend((i as f32).to_le_bytes());
        }
        let path = temp("py2.pth");
        std::fs::write(&path, &p.out).unwrap();
        let f = TorchFile::open(&path).unwrap();
        assert_eq!(f.format(), Format::Legacy);
        assert_eq!(f.keys(), ["conv1_1.bias", "conv1_1.weight", "scale"]);
        // Transposed 2×2 from element 1: [[1, 3], [2, 4]].
        assert_eq!(values(&f, "conv1_1.weight"), [1.0, 3.0, 2.0, 4.0]);
        // The view starts at element 4, the tensor 1 further.
        assert_eq!(values(&f, "conv1_1.bias"), [5.0, 6.0]);
        let scale = f.get("scale").unwrap().unwrap();
        assert_eq!(scale.dtype(), DType::F64);
        assert_eq!(scale.to_vec1::<f64>().unwrap(), [0.25, -1.0, 3.5, 1e-300]);
        std::fs::remove_file(&path).unwrap();
    }

    #[test]
    fn long_ints_round_trip() {
        for v in [
            0,
            255,
            256,
            65536,
            -1,
            -129,
            1 << 40,
            LEGACY_MAGIC,
            -LEGACY_MAGIC,
        ] {
            let mut p = Pickler::default();
            p.int(v);
            p.op(b'.');
            let got = Unpickler {
                stack: Vec::new(),
                memo: HashMap::new(),
                persistent: &mut |_| Err("none".into()),
            }
            .run(&mut Input {
                r: &p.out[..],
                pos: 0,
                len: p.out.len() as u64,
            })
            .unwrap();
            assert_eq!(got.as_int(), Some(v), "{v}");
        }
    }
}
