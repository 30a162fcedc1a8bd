//! What is stored of a flagged item's asset: encoded bytes as received (their media type
//! sniffed), or a numeric tensor kept exactly as a `.npy` file.

/// The media type of encoded image bytes, from their magic number.
pub fn sniff_media_type(data: &[u8]) -> &'static str {
    if data.starts_with(b"\x89PNG\r\n\x1a\n") {
        "image/png"
    } else if data.starts_with(b"\xff\xd8\xff") {
        "image/jpeg"
    } else if data.starts_with(b"GIF87a") || data.starts_with(b"GIF89a") {
        "image/gif"
    } else if data.starts_with(b"RIFF") && data.get(8..12) == Some(b"WEBP") {
        "image/webp"
    } else {
        "application/octet-stream"
    }
}

pub const NPY_MEDIA_TYPE: &str = "application/x-npy";

/// One item of a numeric tensor as a `.npy` file (version 1.0, C order), byte for byte what
/// `numpy.save` writes, so both steps store (and deduplicate) the same bytes. `descr` is
/// numpy's type string, e.g. `<f4`, `|u1`, `|b1`.
pub fn npy_bytes(descr: &str, dims: &[usize], data: &[u8]) -> Vec<u8> {
    let shape = match dims {
        [] => "()".to_string(),
        [d] => format!("({d},)"),
        _ => format!("({})", dims.iter().map(usize::to_string).collect::<Vec<_>>().join(", ")),
    };
    let mut header = format!("{{'descr': '{descr}', 'fortran_order': False, 'shape': {shape}, }}");
    // numpy pads with spaces and a newline so that the data starts on a 64-byte boundary.
    let unpadded = 10 + header.len() + 1;
    header.push_str(&" ".repeat((64 - unpadded % 64) % 64));
    header.push('\n');
    let mut out = Vec::with_capacity(10 + header.len() + data.len());
    out.extend_from_slice(b"\x93NUMPY\x01\x00");
    out.extend_from_slice(&(header.len() as u16).to_le_bytes());
    out.extend_from_slice(header.as_bytes());
    out.extend_from_slice(data);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn media_types() {
        assert_eq!(sniff_media_type(b"\x89PNG\r\n\x1a\nrest"), "image/png");
        assert_eq!(sniff_media_type(b"\xff\xd8\xff\xe0"), "image/jpeg");
        assert_eq!(sniff_media_type(b"RIFF1234WEBPVP8 "), "image/webp");
        assert_eq!(sniff_media_type(b"RIFF12"), "application/octet-stream");
    }

    #[test]
    fn npy_header_is_aligned_like_numpys() {
        let bytes = npy_bytes("<f4", &[1, 2], &[0u8; 8]);
        let header_len = u16::from_le_bytes([bytes[8], bytes[9]]) as usize;
        assert_eq!((10 + header_len) % 64, 0);
        assert!(std::str::from_utf8(&bytes[10..10 + header_len]).unwrap().starts_with("{'descr': '<f4', 'fortran_order': False, 'shape': (1, 2), }"));
        assert_eq!(bytes.len(), 10 + header_len + 8);
    }
}
