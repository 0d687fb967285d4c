//! PNG files of poisons, bases, amplified perturbations, targets, and a contact sheet.

use std::io::BufWriter;
use std::path::Path;

/// An 8-bit image in HWC order (1 or 3 channels).
#[derive(Debug, Clone)]
pub struct Image<'a> {
    pub height: usize,
    pub width: usize,
    pub channels: usize,
    pub data: &'a [u8],
}

pub fn write_png(path: &Path, img: &Image) -> std::io::Result<()> {
    let file = std::fs::File::create(path)?;
    let mut enc = png::Encoder::new(BufWriter::new(file), img.width as u32, img.height as u32);
    enc.set_color(if img.channels == 3 {
        png::ColorType::Rgb
    } else {
        png::ColorType::Grayscale
    });
    enc.set_depth(png::BitDepth::Eight);
    let mut w = enc.write_header().map_err(std::io::Error::other)?;
    w.write_image_data(img.data)
        .map_err(std::io::Error::other)?;
    w.finish().map_err(std::io::Error::other)
}

/// (poison - base) x `gain` around mid-grey, clipped: how the perturbation is shown.
pub fn amplified_difference(poison: &[u8], base: &[u8], gain: f64) -> Vec<u8> {
    poison
        .iter()
        .zip(base)
        .map(|(&p, &b)| {
            (128.0 + gain * (p as f64 - b as f64))
                .round()
                .clamp(0.0, 255.0) as u8
        })
        .collect()
}

/// Tiles equally sized images into a near-square grid with 1-pixel white gaps.
pub fn contact_sheet(
    images: &[&[u8]],
    height: usize,
    width: usize,
    channels: usize,
) -> (usize, usize, Vec<u8>) {
    let n = images.len().max(1);
    let cols = (n as f64).sqrt().ceil() as usize;
    let rows = n.div_ceil(cols);
    let (sh, sw) = (rows * (height + 1) + 1, cols * (width + 1) + 1);
    let mut sheet = vec![255u8; sh * sw * channels];
    for (k, img) in images.iter().enumerate() {
        let (r, c) = (k / cols, k % cols);
        for y in 0..height {
            let dst = ((r * (height + 1) + 1 + y) * sw + c * (width + 1) + 1) * channels;
            let src = y * width * channels;
            sheet[dst..dst + width * channels].copy_from_slice(&img[src..src + width * channels]);
        }
    }
    (sh, sw, sheet)
}
