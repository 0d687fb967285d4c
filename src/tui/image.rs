//! Images in terminal cells: half-blocks ('▀', upper pixel as foreground, lower as background)
//! give two pixel rows per cell; without colour, an ASCII ramp, one character per cell.

use super::app::Palette;
use ratatui::buffer::Buffer;
use ratatui::layout::Rect;
use ratatui::style::{Color, Style};

pub const ASCII_RAMP: &[u8] = b" .:-=+*#%@";

/// Nearest colour of the xterm 256-colour palette (6x6x6 cube or the grey ramp).
pub fn indexed(r: u8, g: u8, b: u8) -> u8 {
    let level = |v: u8| -> u8 {
        if v < 48 {
            0
        } else if v < 115 {
            1
        } else {
            ((v as u16 - 35) / 40) as u8
        }
    };
    let (lr, lg, lb) = (level(r), level(g), level(b));
    let steps = [0u8, 95, 135, 175, 215, 255];
    let cube = 16 + 36 * lr + 6 * lg + lb;
    let cube_rgb = (steps[lr as usize], steps[lg as usize], steps[lb as usize]);
    let grey_avg = (r as u16 + g as u16 + b as u16) / 3;
    let gi = if grey_avg > 238 {
        23
    } else {
        (grey_avg.saturating_sub(3)) / 10
    } as u8;
    let grey_v = 8 + 10 * gi as u16;
    let dist = |a: (u8, u8, u8)| -> i32 {
        let d = |x: u8, y: u16| (x as i32 - y as i32).pow(2);
        d(r, a.0 as u16) + d(g, a.1 as u16) + d(b, a.2 as u16)
    };
    if dist((grey_v as u8, grey_v as u8, grey_v as u8)) < dist(cube_rgb) {
        232 + gi
    } else {
        cube
    }
}

pub fn colour(rgb: (u8, u8, u8), palette: Palette) -> Color {
    match palette {
        Palette::TrueColor => Color::Rgb(rgb.0, rgb.1, rgb.2),
        Palette::Indexed256 => Color::Indexed(indexed(rgb.0, rgb.1, rgb.2)),
        Palette::Mono => Color::Reset,
    }
}

/// An 8-bit HWC image (1 or 3 channels).
pub struct Pixels<'a> {
    pub height: usize,
    pub width: usize,
    pub channels: usize,
    pub data: &'a [u8],
}

impl Pixels<'_> {
    fn rgb(&self, y: usize, x: usize) -> (u8, u8, u8) {
        let i = (y * self.width + x) * self.channels;
        if self.channels == 3 {
            (self.data[i], self.data[i + 1], self.data[i + 2])
        } else {
            (self.data[i], self.data[i], self.data[i])
        }
    }
}

/// The cell size an image takes at integer down-scaling `scale` (1 = full resolution).
pub fn cells(img: &Pixels, scale: usize, ascii: bool) -> (u16, u16) {
    let (h, w) = (img.height.div_ceil(scale), img.width.div_ceil(scale));
    (
        w as u16,
        if ascii {
            h as u16
        } else {
            h.div_ceil(2) as u16
        },
    )
}

/// Draws `img` at `area`'s top-left, sampling every `scale`-th pixel.
pub fn draw(
    buf: &mut Buffer,
    area: Rect,
    img: &Pixels,
    scale: usize,
    ascii: bool,
    palette: Palette,
) {
    let (cw, ch) = cells(img, scale, ascii);
    for cy in 0..ch.min(area.height) {
        for cx in 0..cw.min(area.width) {
            let x = cx as usize * scale;
            let cell = &mut buf[(area.x + cx, area.y + cy)];
            if ascii || palette == Palette::Mono {
                let y = cy as usize * scale;
                let (r, g, b) = img.rgb(y.min(img.height - 1), x.min(img.width - 1));
                let lum = (r as u32 * 299 + g as u32 * 587 + b as u32 * 114) / 1000;
                let k = (lum as usize * (ASCII_RAMP.len() - 1) + 127) / 255;
                cell.set_char(ASCII_RAMP[k] as char)
                    .set_style(Style::default());
            } else {
                let top = (cy as usize * 2) * scale;
                let bottom = top + scale;
                let up = img.rgb(top.min(img.height - 1), x.min(img.width - 1));
                let down = if bottom < img.height {
                    img.rgb(bottom, x.min(img.width - 1))
                } else {
                    (0, 0, 0)
                };
                cell.set_char('▀')
                    .set_fg(colour(up, palette))
                    .set_bg(colour(down, palette));
            }
        }
    }
}
