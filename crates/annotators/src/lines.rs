//! Line drawing exactly as OpenCV's `cv2.line(img, p0, p1, color, thickness=1,
//! lineType=LINE_8, shift=0)` draws it (OpenCV 4.x, `drawing.cpp` / `LineIterator`).
//!
//! What OpenCV does for that call, and what [`draw_line`] reproduces pixel for pixel:
//!
//! 1. If an endpoint lies outside the image, the segment is clipped to the pixel rectangle
//!    `[0, w-1] × [0, h-1]` by `cv::clipLine`: endpoints outside the top/bottom edge are moved
//!    onto it first, then those outside the left/right edge, each move computing the other
//!    coordinate as `old + (i64)((double)(edge - old) * d_other / d_this)` (truncation toward
//!    zero, with the deltas of the partially clipped segment). A segment that misses the image
//!    draws nothing.
//! 2. The segment is walked left to right (the endpoints are swapped when `x1 < x0`, so a line
//!    and its reverse draw the same pixels) by an 8-connected Bresenham iterator over
//!    `max(|dx|, |dy|) + 1` pixels with error term `err = dx - 2·dy` (major/minor axes after the
//!    steep swap): each step moves one pixel along the major axis and, when `err < 0`, one along
//!    the minor axis too (`err += 2·dx - 2·dy`), otherwise `err -= 2·dy`.
//! 3. A zero-length segment draws its single pixel.
//!
//! Endpoints are `i32` like OpenCV's `cv::Point`; the clipping arithmetic runs in `i64`/`f64`
//! as in OpenCV, so any `i32` endpoints are handled. The parity test (`neural-annotators`'
//! `tests/mlsd.rs`) compares a table of steep, shallow, reversed, off-image and zero-length
//! lines with images drawn by OpenCV.
use image::{ImageBuffer, Pixel};

/// `cv::clipLine` for a `w`×`h` image: the clipped endpoints, or `None` when the segment lies
/// entirely outside.
pub fn clip_line(
    w: i64,
    h: i64,
    p0: (i64, i64),
    p1: (i64, i64),
) -> Option<((i64, i64), (i64, i64))> {
    if w <= 0 || h <= 0 {
        return None;
    }
    let (right, bottom) = (w - 1, h - 1);
    let (mut x1, mut y1) = p0;
    let (mut x2, mut y2) = p1;
    let code = |x: i64, y: i64| -> u32 {
        (x < 0) as u32
            | ((x > right) as u32) << 1
            | ((y < 0) as u32) << 2
            | ((y > bottom) as u32) << 3
    };
    let mut c1 = code(x1, y1);
    let mut c2 = code(x2, y2);
    if c1 & c2 == 0 && c1 | c2 != 0 {
        // Outside the top or bottom edge: move onto it.
        if c1 & 12 != 0 {
            let a = if c1 < 8 { 0 } else { bottom };
            x1 += ((a - y1) as f64 * (x2 - x1) as f64 / (y2 - y1) as f64) as i64;
            y1 = a;
            c1 = (x1 < 0) as u32 | ((x1 > right) as u32) << 1;
        }
        if c2 & 12 != 0 {
            let a = if c2 < 8 { 0 } else { bottom };
            x2 += ((a - y2) as f64 * (x2 - x1) as f64 / (y2 - y1) as f64) as i64;
            y2 = a;
            c2 = (x2 < 0) as u32 | ((x2 > right) as u32) << 1;
        }
        // Outside the left or right edge: move onto it.
        if c1 & c2 == 0 && c1 | c2 != 0 {
            if c1 != 0 {
                let a = if c1 == 1 { 0 } else { right };
                y1 += ((a - x1) as f64 * (y2 - y1) as f64 / (x2 - x1) as f64) as i64;
                x1 = a;
                c1 = 0;
            }
            if c2 != 0 {
                let a = if c2 == 1 { 0 } else { right };
                y2 += ((a - x2) as f64 * (y2 - y1) as f64 / (x2 - x1) as f64) as i64;
                x2 = a;
                c2 = 0;
            }
        }
    }
    if c1 | c2 == 0 {
        Some(((x1, y1), (x2, y2)))
    } else {
        None
    }
}

/// The pixels `cv2.line(img, p0, p1, color, 1, LINE_8)` sets on a `w`×`h` image, in the order
/// OpenCV visits them (left to right).
pub fn line_pixels(w: u32, h: u32, p0: (i32, i32), p1: (i32, i32)) -> Vec<(u32, u32)> {
    let (w, h) = (w as i64, h as i64);
    let (mut a, mut b) = ((p0.0 as i64, p0.1 as i64), (p1.0 as i64, p1.1 as i64));
    let inside = |p: (i64, i64)| (0..w).contains(&p.0) && (0..h).contains(&p.1);
    if !inside(a) || !inside(b) {
        match clip_line(w, h, a, b) {
            Some((c, d)) => (a, b) = (c, d),
            None => return Vec::new(),
        }
    }
    if b.0 < a.0 {
        std::mem::swap(&mut a, &mut b);
    }
    let mut dx = b.0 - a.0;
    let mut dy = b.1 - a.1;
    let sy = if dy < 0 { -1 } else { 1 };
    dy = dy.abs();
    let steep = dy > dx;
    if steep {
        std::mem::swap(&mut dx, &mut dy);
    }
    let mut err = dx - 2 * dy;
    let (mut x, mut y) = a;
    let mut out = Vec::with_capacity(dx as usize + 1);
    for _ in 0..=dx {
        out.push((x as u32, y as u32));
        if err < 0 {
            err += 2 * dx - 2 * dy;
            x += 1;
            y += sy;
        } else {
            err -= 2 * dy;
            if steep {
                y += sy;
            } else {
                x += 1;
            }
        }
    }
    out
}

/// Draws the segment `p0`–`p1` on `img` in `color`, exactly as
/// `cv2.line(img, p0, p1, color, thickness=1, lineType=cv2.LINE_8)` does.
pub fn draw_line<P: Pixel>(
    img: &mut ImageBuffer<P, Vec<P::Subpixel>>,
    p0: (i32, i32),
    p1: (i32, i32),
    color: P,
) {
    let (w, h) = img.dimensions();
    for (x, y) in line_pixels(w, h, p0, p1) {
        img.put_pixel(x, y, color);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use image::{GrayImage, Luma};

    fn drawn(w: u32, h: u32, p0: (i32, i32), p1: (i32, i32)) -> Vec<(u32, u32)> {
        let mut img = GrayImage::new(w, h);
        draw_line(&mut img, p0, p1, Luma([255]));
        let mut v: Vec<(u32, u32)> = img
            .enumerate_pixels()
            .filter(|p| p.2[0] == 255)
            .map(|p| (p.0, p.1))
            .collect();
        v.sort();
        v
    }

    #[test]
    fn basic_shapes() {
        assert_eq!(drawn(5, 5, (2, 2), (2, 2)), vec![(2, 2)]);
        assert_eq!(drawn(5, 5, (0, 1), (4, 1)).len(), 5);
        assert_eq!(drawn(5, 5, (0, 0), (4, 4)).len(), 5);
        // reversed draws the same pixels
        assert_eq!(drawn(9, 7, (1, 5), (8, 0)), drawn(9, 7, (8, 0), (1, 5)));
        // entirely outside
        assert!(drawn(5, 5, (-3, -1), (-1, -9)).is_empty());
        // clipped
        assert_eq!(drawn(5, 5, (-10, 2), (10, 2)).len(), 5);
        assert_eq!(drawn(4, 4, (i32::MIN, 0), (i32::MAX, 3)).len(), 4);
    }
}
