//! Request tensors as the step needs them: class scores as contiguous f32, assets item by item.

use std::borrow::Cow;

use triton_al_step::{npy_bytes, sniff_media_type, Assets, NPY_MEDIA_TYPE};

use crate::triton::{datatype_name, sys, Input};

/// A shape with the batch axis first, as non-negative sizes.
pub fn sizes(name: &str, shape: &[i64]) -> Result<Vec<usize>, String> {
    shape.iter().map(|&d| usize::try_from(d).map_err(|_| format!("{name}: negative dimension in shape {shape:?}"))).collect()
}

/// The class scores as f32: borrowed when the input is FP32 and suitably aligned, converted
/// (one copy) from FP16 or FP64.
pub fn scores<'a>(input: &Input<'a>, shape: &[usize]) -> Result<Cow<'a, [f32]>, String> {
    let name = input.name();
    let bytes = input.bytes()?;
    let count: usize = shape.iter().product();
    let width = match input.datatype() {
        sys::TRITONSERVER_TYPE_FP32 => 4,
        sys::TRITONSERVER_TYPE_FP16 => 2,
        sys::TRITONSERVER_TYPE_FP64 => 8,
        other => return Err(format!("{name}: expected FP16, FP32 or FP64 class scores, got {}", datatype_name(other))),
    };
    if bytes.len() != count * width {
        return Err(format!("{name}: shape {shape:?} needs {} bytes, the request carries {}", count * width, bytes.len()));
    }
    Ok(match (input.datatype(), bytes) {
        (sys::TRITONSERVER_TYPE_FP32, Cow::Borrowed(b)) if (b.as_ptr() as usize) % 4 == 0 => {
            // SAFETY: `b` holds `count` f32 values (length checked above), is 4-byte aligned, and
            // every bit pattern is a valid f32; it lives as long as the request ('a).
            Cow::Borrowed(unsafe { std::slice::from_raw_parts(b.as_ptr().cast::<f32>(), count) })
        }
        (sys::TRITONSERVER_TYPE_FP32, b) => Cow::Owned(b.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()),
        (sys::TRITONSERVER_TYPE_FP16, b) => Cow::Owned(b.chunks_exact(2).map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32()).collect()),
        (_, b) => Cow::Owned(b.chunks_exact(8).map(|c| f64::from_le_bytes(c.try_into().unwrap_or([0; 8])) as f32).collect()),
    })
}

/// Detection boxes as f32: FP32 only (x0, y0, x1, y1 per box), borrowed when aligned.
pub fn boxes<'a>(input: &Input<'a>, shape: &[usize]) -> Result<Cow<'a, [f32]>, String> {
    if input.datatype() != sys::TRITONSERVER_TYPE_FP32 {
        return Err(format!("{}: expected FP32 boxes, got {}", input.name(), datatype_name(input.datatype())));
    }
    scores(input, shape)
}

/// A model's embeddings as f32: FP32 only (an embedding of D values per item), borrowed when
/// aligned, so a batch without flagged items copies nothing.
pub fn embedding<'a>(input: &Input<'a>, shape: &[usize]) -> Result<Cow<'a, [f32]>, String> {
    if input.datatype() != sys::TRITONSERVER_TYPE_FP32 {
        return Err(format!("{}: expected FP32 embeddings, got {}", input.name(), datatype_name(input.datatype())));
    }
    scores(input, shape)
}

/// numpy's type string for a Triton numeric type (what `numpy.save` records).
fn npy_descr(datatype: sys::TRITONSERVER_DataType) -> Option<&'static str> {
    Some(match datatype {
        sys::TRITONSERVER_TYPE_BOOL => "|b1",
        sys::TRITONSERVER_TYPE_UINT8 => "|u1",
        sys::TRITONSERVER_TYPE_INT8 => "|i1",
        sys::TRITONSERVER_TYPE_UINT16 => "<u2",
        sys::TRITONSERVER_TYPE_INT16 => "<i2",
        sys::TRITONSERVER_TYPE_UINT32 => "<u4",
        sys::TRITONSERVER_TYPE_INT32 => "<i4",
        sys::TRITONSERVER_TYPE_UINT64 => "<u8",
        sys::TRITONSERVER_TYPE_INT64 => "<i8",
        sys::TRITONSERVER_TYPE_FP16 => "<f2",
        sys::TRITONSERVER_TYPE_FP32 => "<f4",
        sys::TRITONSERVER_TYPE_FP64 => "<f8",
        _ => return None,
    })
}

/// The elements of a serialized BYTES tensor (each a little-endian u32 length, then the bytes).
pub fn bytes_elements(name: &str, data: &[u8]) -> Result<Vec<(usize, usize)>, String> {
    let mut spans = Vec::new();
    let mut at = 0;
    while at < data.len() {
        let len = data.get(at..at + 4).map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize);
        match len {
            Some(len) if at + 4 + len <= data.len() => {
                spans.push((at + 4, len));
                at += 4 + len;
            }
            _ => return Err(format!("{name}: malformed BYTES tensor (an element runs past the end at byte {at})")),
        }
    }
    Ok(spans)
}

/// A request's asset input: encoded bytes per item (a BYTES tensor with one element per
/// item), or a numeric tensor whose items are stored as `.npy`. Nothing is parsed or copied
/// until a flagged item asks for its asset.
pub struct AssetTensor<'a> {
    name: String,
    datatype: sys::TRITONSERVER_DataType,
    batch: usize,
    item_dims: Vec<usize>,
    data: Cow<'a, [u8]>,
    elements: std::cell::OnceCell<Result<Vec<(usize, usize)>, String>>,
}

impl<'a> AssetTensor<'a> {
    pub fn new(input: &Input<'a>) -> Result<AssetTensor<'a>, String> {
        let shape = sizes(input.name(), &input.shape())?;
        let Some((&batch, item_dims)) = shape.split_first() else {
            return Err(format!("{}: expected a batched tensor, got shape []", input.name()));
        };
        Ok(AssetTensor {
            name: input.name().to_string(),
            datatype: input.datatype(),
            batch,
            item_dims: item_dims.to_vec(),
            data: input.bytes()?,
            elements: std::cell::OnceCell::new(),
        })
    }
}

impl Assets for AssetTensor<'_> {
    fn len(&self) -> usize {
        self.batch
    }

    fn asset(&self, index: usize) -> Result<(Vec<u8>, &'static str), String> {
        let per_item: usize = self.item_dims.iter().product();
        if self.datatype == sys::TRITONSERVER_TYPE_BYTES {
            if per_item != 1 {
                return Err(format!("{}: expected one encoded asset per item, got {per_item} elements per item", self.name));
            }
            let elements = self.elements.get_or_init(|| bytes_elements(&self.name, &self.data)).as_ref().map_err(Clone::clone)?;
            let &(start, len) = elements.get(index).ok_or_else(|| format!("{}: no element for item {index}", self.name))?;
            let data = self.data[start..start + len].to_vec();
            if data.is_empty() {
                return Err(format!("{}: item {index} is empty", self.name));
            }
            let media_type = sniff_media_type(&data);
            return Ok((data, media_type));
        }
        let descr = npy_descr(self.datatype).ok_or_else(|| format!("{}: cannot store assets of type {}", self.name, datatype_name(self.datatype)))?;
        let width = crate::triton::datatype_byte_size(self.datatype) as usize;
        let item_bytes = per_item * width;
        let data = self.data.get(index * item_bytes..(index + 1) * item_bytes).ok_or_else(|| format!("{}: no data for item {index}", self.name))?;
        Ok((npy_bytes(descr, &self.item_dims, data), NPY_MEDIA_TYPE))
    }
}

/// The first element of a MODEL_VERSION input (BYTES or an integer), as text.
pub fn model_version(input: &Input<'_>) -> Option<String> {
    let data = input.bytes().ok()?;
    match input.datatype() {
        sys::TRITONSERVER_TYPE_BYTES => {
            let (start, len) = *bytes_elements(input.name(), &data).ok()?.first()?;
            String::from_utf8(data[start..start + len].to_vec()).ok()
        }
        sys::TRITONSERVER_TYPE_INT64 => data.get(..8).map(|b| i64::from_le_bytes(b.try_into().unwrap_or([0; 8])).to_string()),
        sys::TRITONSERVER_TYPE_INT32 => data.get(..4).map(|b| i32::from_le_bytes(b.try_into().unwrap_or([0; 4])).to_string()),
        _ => None,
    }
}
