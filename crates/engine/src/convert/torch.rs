//! PyTorch checkpoints (`torch.save`'s zip format, PyTorch 1.6 and later) read without Python.
//!
//! The archive holds `<name>/data.pkl`, a pickle of the saved object, and one member
//! `<name>/data/<key>` per storage. candle's pickle machine parses the opcodes; this module turns
//! its objects into a [`Value`] tree (dicts in their saved order, `argparse.Namespace` objects with
//! their attributes, tensors as [`TensorRef`]s) and reads each tensor's storage from the archive,
//! honouring its offset and strides.

use std::io::{Cursor, Read, Seek};
use std::path::{Path, PathBuf};

use candle_core::pickle::{Object, Stack};
use candle_core::{DType, Device, Tensor};

/// Why a checkpoint could not be read.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error("cannot read {path}: {reason}")]
    Io { path: PathBuf, reason: String },
    #[error(
        "{path} is in PyTorch's legacy format (saved by torch < 1.6), which is not read here; \
         re-save it in the zip format with: python -c \"import torch; \
         torch.save(torch.load('{path}', map_location='cpu'), 'model_optim_rng.pt')\""
    )]
    Legacy { path: PathBuf },
    #[error("{path} is not a complete zip archive (truncated or damaged?): {reason}")]
    NotZip { path: PathBuf, reason: String },
    #[error("{path} holds no PyTorch checkpoint: no {expected} among its members ({members})")]
    MissingMember {
        path: PathBuf,
        expected: String,
        members: String,
    },
    #[error("{path}: {reason}")]
    Bad { path: PathBuf, reason: String },
}

/// A value of the saved object tree.
#[derive(Debug, Clone)]
pub enum Value {
    None,
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(String),
    List(Vec<Value>),
    Tuple(Vec<Value>),
    /// A dict (or OrderedDict), its entries in the saved order.
    Dict(Vec<(Value, Value)>),
    Tensor(TensorRef),
    /// An object rebuilt from its class and attribute dict (`argparse.Namespace`).
    Object {
        class: String,
        attributes: Vec<(String, Value)>,
    },
    /// Anything else (a class, a call this reader does not interpret), by name.
    Other(String),
}

impl Value {
    /// The entry `key` of a dict, or the attribute `key` of an object.
    pub fn get(&self, key: &str) -> Option<&Value> {
        match self {
            Self::Dict(entries) => entries
                .iter()
                .find(|(k, _)| matches!(k, Self::Str(name) if name == key))
                .map(|(_, v)| v),
            Self::Object { attributes, .. } => attributes
                .iter()
                .find(|(name, _)| name == key)
                .map(|(_, v)| v),
            _ => None,
        }
    }

    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            Self::Float(v) => Some(v),
            Self::Int(v) => Some(v as f64),
            _ => None,
        }
    }

    pub fn as_usize(&self) -> Option<usize> {
        match *self {
            Self::Int(v) => usize::try_from(v).ok(),
            _ => None,
        }
    }

    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            Self::Bool(v) => Some(v),
            _ => None,
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            Self::Str(v) => Some(v),
            _ => None,
        }
    }

    /// The string-keyed entries of a dict, in order.
    pub fn entries(&self) -> Vec<(&str, &Value)> {
        match self {
            Self::Dict(entries) => entries
                .iter()
                .filter_map(|(k, v)| k.as_str().map(|k| (k, v)))
                .collect(),
            _ => Vec::new(),
        }
    }
}

/// Where a saved tensor's elements are: its storage, and the view of it.
#[derive(Debug, Clone)]
pub struct TensorRef {
    storage: String,
    dtype: DType,
    /// Elements in the storage.
    storage_len: usize,
    /// First element of the view, in elements.
    offset: usize,
    pub shape: Vec<usize>,
    stride: Vec<usize>,
}

impl TensorRef {
    pub fn dtype(&self) -> DType {
        self.dtype
    }
}

/// An opened checkpoint: the saved object and the archive its storages are read from.
pub struct Checkpoint {
    path: PathBuf,
    archive: zip::ZipArchive<Box<dyn ReadSeek>>,
    /// The folder of data.pkl inside the archive.
    prefix: String,
    /// The saved object.
    pub root: Value,
}

trait ReadSeek: Read + Seek {}
impl<T: Read + Seek> ReadSeek for T {}

/// The member a Megatron-LM release archive keeps its checkpoint in.
pub const MEGATRON_MEMBER: &str = "release/mp_rank_00/model_optim_rng.pt";

const ZIP_MAGIC: &[u8] = b"PK";
const PICKLE_PROTOCOL_2: u8 = 0x80;

impl Checkpoint {
    /// Opens `path`: a torch.save file, or a zip archive holding one at [`MEGATRON_MEMBER`] (the
    /// way Megatron-LM checkpoints are distributed).
    pub fn open(path: &Path) -> Result<Self, CheckpointError> {
        let io = |e: std::io::Error| CheckpointError::Io {
            path: path.to_owned(),
            reason: e.to_string(),
        };
        let mut file = std::fs::File::open(path).map_err(io)?;
        let mut magic = [0u8; 2];
        let read = file.read(&mut magic).map_err(io)?;
        file.rewind().map_err(io)?;
        if read == 2 && magic[0] == PICKLE_PROTOCOL_2 {
            return Err(CheckpointError::Legacy {
                path: path.to_owned(),
            });
        }
        if read < 2 || magic != ZIP_MAGIC {
            return Err(CheckpointError::NotZip {
                path: path.to_owned(),
                reason: "it does not start like a zip archive".into(),
            });
        }
        let archive = open_zip(path, Box::new(std::io::BufReader::new(file)))?;
        if data_pickle(&archive).is_some() {
            return Self::from_archive(path, archive);
        }
        // A release archive: the checkpoint is a member, itself a torch.save zip.
        let mut archive = archive;
        let members = member_names(&archive);
        let Some(member) = members
            .iter()
            .find(|name| name.as_str() == MEGATRON_MEMBER)
            .cloned()
        else {
            return Err(CheckpointError::MissingMember {
                path: path.to_owned(),
                expected: format!("{MEGATRON_MEMBER} or data.pkl"),
                members: list(&members),
            });
        };
        let mut bytes = Vec::new();
        archive
            .by_name(&member)
            .and_then(|mut entry| entry.read_to_end(&mut bytes).map_err(Into::into))
            .map_err(|e| CheckpointError::NotZip {
                path: path.to_owned(),
                reason: format!("reading {member}: {e}"),
            })?;
        let inner = path.join(&member);
        if bytes.first() == Some(&PICKLE_PROTOCOL_2) {
            return Err(CheckpointError::Legacy { path: inner });
        }
        let archive = open_zip(&inner, Box::new(Cursor::new(bytes)))?;
        Self::from_archive(&inner, archive)
    }

    fn from_archive(
        path: &Path,
        mut archive: zip::ZipArchive<Box<dyn ReadSeek>>,
    ) -> Result<Self, CheckpointError> {
        let bad = |reason: String| CheckpointError::Bad {
            path: path.to_owned(),
            reason,
        };
        let pickle = data_pickle(&archive).ok_or_else(|| CheckpointError::MissingMember {
            path: path.to_owned(),
            expected: "data.pkl".into(),
            members: list(&member_names(&archive)),
        })?;
        let prefix = pickle.trim_end_matches("data.pkl").to_owned();
        let mut bytes = Vec::new();
        archive
            .by_name(&pickle)
            .and_then(|mut entry| entry.read_to_end(&mut bytes).map_err(Into::into))
            .map_err(|e| bad(format!("reading {pickle}: {e}")))?;
        let mut stack = Stack::empty();
        stack
            .read_loop(&mut Cursor::new(bytes))
            .map_err(|e| bad(format!("cannot parse {pickle}: {e}")))?;
        let object = stack
            .finalize()
            .map_err(|e| bad(format!("cannot parse {pickle}: {e}")))?;
        let root = value(object).map_err(bad)?;
        Ok(Self {
            path: path.to_owned(),
            archive,
            prefix,
            root,
        })
    }

    /// The file this checkpoint was read from (a member of a release archive is named as
    /// `ARCHIVE/MEMBER`).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Reads `tensor` from its storage, contiguous, on the CPU.
    pub fn tensor(&mut self, tensor: &TensorRef) -> Result<Tensor, CheckpointError> {
        let bad = |reason: String| CheckpointError::Bad {
            path: self.path.clone(),
            reason,
        };
        let member = format!("{}data/{}", self.prefix, tensor.storage);
        let size = tensor.dtype.size_in_bytes();
        let mut storage = Vec::with_capacity(tensor.storage_len * size);
        self.archive
            .by_name(&member)
            .and_then(|mut entry| entry.read_to_end(&mut storage).map_err(Into::into))
            .map_err(|e| bad(format!("reading storage {member}: {e}")))?;
        if storage.len() < tensor.storage_len * size {
            return Err(bad(format!(
                "storage {member} has {} bytes, {} expected",
                storage.len(),
                tensor.storage_len * size
            )));
        }
        let elements: usize = tensor.shape.iter().product();
        let mut bytes = Vec::with_capacity(elements * size);
        let mut index = vec![0usize; tensor.shape.len()];
        for _ in 0..elements {
            let at = tensor.offset
                + index
                    .iter()
                    .zip(&tensor.stride)
                    .map(|(i, s)| i * s)
                    .sum::<usize>();
            let range = at * size..(at + 1) * size;
            let element = storage.get(range).ok_or_else(|| {
                bad(format!(
                    "a tensor of shape {:?} reads past the end of storage {member}",
                    tensor.shape
                ))
            })?;
            bytes.extend_from_slice(element);
            for dim in (0..index.len()).rev() {
                index[dim] += 1;
                if index[dim] < tensor.shape[dim] {
                    break;
                }
                index[dim] = 0;
            }
        }
        Tensor::from_raw_buffer(&bytes, tensor.dtype, &tensor.shape, &Device::Cpu)
            .map_err(|e| bad(format!("building a tensor from {member}: {e}")))
    }
}

fn open_zip(
    path: &Path,
    reader: Box<dyn ReadSeek>,
) -> Result<zip::ZipArchive<Box<dyn ReadSeek>>, CheckpointError> {
    zip::ZipArchive::new(reader).map_err(|e| CheckpointError::NotZip {
        path: path.to_owned(),
        reason: e.to_string(),
    })
}

fn member_names(archive: &zip::ZipArchive<Box<dyn ReadSeek>>) -> Vec<String> {
    archive
        .file_names()
        .filter_map(|name| name.ok().map(|name| name.into_owned()))
        .collect()
}

fn data_pickle(archive: &zip::ZipArchive<Box<dyn ReadSeek>>) -> Option<String> {
    member_names(archive)
        .into_iter()
        .find(|name| name == "data.pkl" || name.ends_with("/data.pkl"))
}

/// The first few names of `members`, for an error message.
fn list(members: &[String]) -> String {
    const SHOWN: usize = 8;
    let mut shown = members
        .iter()
        .take(SHOWN)
        .cloned()
        .collect::<Vec<_>>()
        .join(", ");
    if members.len() > SHOWN {
        shown.push_str(&format!(", and {} more", members.len() - SHOWN));
    }
    if shown.is_empty() {
        shown = "none".into();
    }
    shown
}

/// The [`Value`] of a parsed pickle object.
fn value(object: Object) -> Result<Value, String> {
    Ok(match object {
        Object::None => Value::None,
        Object::Bool(v) => Value::Bool(v),
        Object::Int(v) => Value::Int(v.into()),
        Object::Long(v) => Value::Int(v),
        Object::Float(v) => Value::Float(v),
        Object::Unicode(v) => Value::Str(v),
        Object::Tuple(items) => {
            Value::Tuple(items.into_iter().map(value).collect::<Result<_, _>>()?)
        }
        Object::List(items) => Value::List(items.into_iter().map(value).collect::<Result<_, _>>()?),
        Object::Dict(entries) => Value::Dict(
            entries
                .into_iter()
                .map(|(k, v)| Ok((value(k)?, value(v)?)))
                .collect::<Result<_, String>>()?,
        ),
        Object::Class {
            module_name,
            class_name,
        } => Value::Other(format!("{module_name}.{class_name}")),
        Object::Reduce { callable, args } => reduce(*callable, *args)?,
        Object::Build { callable, args } => match (value(*callable)?, *args) {
            // NEWOBJ then BUILD with the instance dict: an object with attributes.
            (Value::Object { class, .. }, Object::Dict(state)) => Value::Object {
                class,
                attributes: state
                    .into_iter()
                    .filter_map(|(k, v)| match k {
                        Object::Unicode(name) => Some(value(v).map(|v| (name, v))),
                        _ => None,
                    })
                    .collect::<Result<_, _>>()?,
            },
            // A parameter or tensor whose extra state is set by BUILD: the tensor itself.
            (tensor @ Value::Tensor(_), _) => tensor,
            (other, _) => other,
        },
        Object::Mark => return Err("unbalanced pickle (a stray MARK)".into()),
        Object::PersistentLoad(_) => Value::Other("a storage outside a tensor".into()),
    })
}

/// The [`Value`] of a call `callable(*args)`.
fn reduce(callable: Object, args: Object) -> Result<Value, String> {
    let Object::Class {
        module_name,
        class_name,
    } = &callable
    else {
        return Ok(Value::Other("a call of a computed callable".into()));
    };
    let mut arguments = match args {
        Object::Tuple(items) => items,
        other => vec![other],
    };
    match (module_name.as_str(), class_name.as_str()) {
        ("torch._utils", "_rebuild_tensor_v2") => tensor(arguments).map(Value::Tensor),
        ("torch._utils", "_rebuild_parameter") if !arguments.is_empty() => {
            value(arguments.swap_remove(0))
        }
        // (func, type, args, state): the tensor is func(*args).
        ("torch._tensor", "_rebuild_from_type_v2") if arguments.len() >= 3 => {
            let inner_args = arguments.swap_remove(2);
            let func = arguments.swap_remove(0);
            reduce(func, inner_args)
        }
        _ => Ok(Value::Object {
            class: format!("{module_name}.{class_name}"),
            attributes: Vec::new(),
        }),
    }
}

/// A tensor from `_rebuild_tensor_v2(storage, storage_offset, size, stride, ...)`.
fn tensor(mut arguments: Vec<Object>) -> Result<TensorRef, String> {
    if arguments.len() < 4 {
        return Err("a tensor with fewer than four rebuild arguments".into());
    }
    let dims = |object: Object, what: &str| -> Result<Vec<usize>, String> {
        match object {
            Object::Tuple(items) => items
                .into_iter()
                .map(|item| match item {
                    Object::Int(v) if v >= 0 => Ok(v as usize),
                    Object::Long(v) if v >= 0 => Ok(v as usize),
                    other => Err(format!("a tensor {what} entry {other:?}")),
                })
                .collect(),
            other => Err(format!("a tensor {what} {other:?}")),
        }
    };
    let stride = dims(arguments.swap_remove(3), "stride")?;
    let shape = dims(arguments.swap_remove(2), "size")?;
    let offset = match arguments.swap_remove(1) {
        Object::Int(v) if v >= 0 => v as usize,
        Object::Long(v) if v >= 0 => v as usize,
        other => return Err(format!("a tensor offset {other:?}")),
    };
    let Object::PersistentLoad(storage) = arguments.swap_remove(0) else {
        return Err("a tensor without a storage".into());
    };
    // ('storage', storage_type, key, location, numel)
    let Object::Tuple(mut fields) = *storage else {
        return Err("a storage id that is not a tuple".into());
    };
    if fields.len() < 5 {
        return Err("a storage id with fewer than five fields".into());
    }
    let storage_len = match fields.swap_remove(4) {
        Object::Int(v) if v >= 0 => v as usize,
        Object::Long(v) if v >= 0 => v as usize,
        other => return Err(format!("a storage size {other:?}")),
    };
    let key = match fields.swap_remove(2) {
        Object::Unicode(key) => key,
        other => return Err(format!("a storage key {other:?}")),
    };
    let dtype = match fields.swap_remove(1) {
        Object::Class { class_name, .. } => match class_name.as_str() {
            "FloatStorage" => DType::F32,
            "HalfStorage" => DType::F16,
            "BFloat16Storage" => DType::BF16,
            "DoubleStorage" => DType::F64,
            "LongStorage" => DType::I64,
            "IntStorage" => DType::I32,
            "ByteStorage" | "BoolStorage" => DType::U8,
            other => return Err(format!("storages of type {other} are not supported")),
        },
        other => return Err(format!("a storage type {other:?}")),
    };
    if shape.len() != stride.len() {
        return Err(format!(
            "a tensor of size {shape:?} with strides {stride:?}"
        ));
    }
    Ok(TensorRef {
        storage: key,
        dtype,
        storage_len,
        offset,
        shape,
        stride,
    })
}
