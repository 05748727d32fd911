//! OpenCV 4.x drawing primitives, pixel for pixel (`imgproc/src/drawing.cpp`), for 8-bit images
//! with the default `lineType = LINE_8` and `shift = 0`:
//!
//! * [`ellipse2poly`] — `cv2.ellipse2Poly(center, axes, angle, arcStart, arcEnd, delta)`;
//! * [`fill_convex_poly`] — `cv2.fillConvexPoly(img, pts, color)`;
//! * [`circle`] — `cv2.circle(img, center, radius, color, thickness)` for `thickness` `-1`
//!   (filled) or `1`;
//! * [`line`] — `cv2.line(img, p0, p1, color, thickness)` for any thickness (`1` is
//!   [`crate::lines::draw_line`]);
//! * [`saturate_u8`] — how OpenCV turns a float colour component into a byte.
//!
//! What OpenCV does, and what this module reproduces:
//!
//! * **ellipse2Poly** works in whole degrees with a table of `sin` for 0..=450° stored as 7-digit
//!   `float`s (`SinTable`, reproduced here from the same values). The angle is brought into
//!   `0..=360`, the arc into `0..=360` (swapped if reversed, shifted by whole turns, `0..360` if
//!   longer than a turn); for `i = start, start+delta, …` while `i < end + delta` (the last one
//!   clamped to `end`) the point is `center + (a·cos i, b·sin i)` rotated by the angle, in
//!   `double` from the `float` table values, rounded half-to-even (`cvRound`); consecutive
//!   duplicates are dropped, and a single point becomes the centre twice.
//! * **FillConvexPoly** first draws the outline — with `shift = 0` as 8-connected Bresenham
//!   lines between the vertices ([`crate::lines`]), with `shift = 16` (thick lines) with
//!   OpenCV's fixed-point `Line2` — then walks the two chains of edges down from the topmost
//!   vertex in 16.16 fixed point: each edge gets `dx = ((xe−xs)·2 + (ye−y)) / (2·(ye−y))`
//!   (integer division) and starts at its upper vertex's `x`; each row fills
//!   `[(xl + ½) >> 16, (xr + ½) >> 16]`, clipped to the image. The walk stops after
//!   `npts` edges. Rows above the image are stepped over arithmetically (same result, no
//!   per-row cost); polygons with fewer than 3 points draw only their outline.
//! * **Circle** (`thickness` `1` or `-1`, `LINE_8`, no shift) is OpenCV's own midpoint circle:
//!   octant points `(±dx, ±dy)`, `(±dy, ±dx)` with its `err / plus / minus` update, filled as
//!   horizontal spans, clipped per span when the circle is not entirely inside.
//! * **ThickLine** (`thickness > 1`): the segment is first clipped (`clipLine`, integer points)
//!   to the image grown by `thickness` pixels on each side — OpenCV 4.13+ does this, which
//!   changes the pixels of lines with an endpoint outside that margin, as the clipped endpoint
//!   is rounded — and dropped if it misses it; then, in 16.16 fixed point, the offset
//!   `dp = cvRound((dy, dx) · (t·2¹⁵ + (t odd)·2¹⁵) / |p1−p0|)` gives the quadrilateral
//!   `p0+dp, p0−dp, p1−dp, p1+dp` filled by FillConvexPoly with `shift = 16`, then both ends
//!   get a filled [`circle`] of radius `(t + 1) / 2` (integer division) at the rounded
//!   endpoints. A zero-length line draws only the end circles.
//!
//! Coordinates are `i32` like OpenCV's `cv::Point`; the arithmetic runs in `i64`/`f64` as in
//! OpenCV, and nothing is written outside the image. The parity test `tests/draw_cv.rs`
//! compares ellipse polygons, filled polygons, circles and thick lines with OpenCV's output
//! (fixtures written by `tools/parity/neural/make_openpose_draw.py`).
//!
//! Departures, for inputs OpenCV rejects or mishandles: `delta < 1` in [`ellipse2poly`] is
//! taken as 1 (OpenCV would loop forever); a negative radius draws nothing (OpenCV asserts);
//! `thickness` for [`line`] is clamped to `1..=32767` (OpenCV asserts).
use image::{ImageBuffer, Pixel};

use crate::lines;

const XY_SHIFT: u32 = 16;
const XY_ONE: i64 = 1 << XY_SHIFT;
const HALF: i64 = XY_ONE >> 1;

type Img<P> = ImageBuffer<P, Vec<<P as Pixel>::Subpixel>>;

/// `sin` of 0..=90 whole degrees as OpenCV's `SinTable` stores them (7-digit `float`s); the
/// rest of its 451 entries follow by symmetry ([`sin_table`]). Written digit for digit as
/// OpenCV writes them.
#[allow(clippy::excessive_precision, clippy::approx_constant)]
const SIN_QUADRANT: [f32; 91] = [
    0.0000000, 0.0174524, 0.0348995, 0.0523360, 0.0697565, 0.0871557, 0.1045285, 0.1218693,
    0.1391731, 0.1564345, 0.1736482, 0.1908090, 0.2079117, 0.2249511, 0.2419219, 0.2588190,
    0.2756374, 0.2923717, 0.3090170, 0.3255682, 0.3420201, 0.3583679, 0.3746066, 0.3907311,
    0.4067366, 0.4226183, 0.4383711, 0.4539905, 0.4694716, 0.4848096, 0.5000000, 0.5150381,
    0.5299193, 0.5446390, 0.5591929, 0.5735764, 0.5877853, 0.6018150, 0.6156615, 0.6293204,
    0.6427876, 0.6560590, 0.6691306, 0.6819984, 0.6946584, 0.7071068, 0.7193398, 0.7313537,
    0.7431448, 0.7547096, 0.7660444, 0.7771460, 0.7880108, 0.7986355, 0.8090170, 0.8191520,
    0.8290376, 0.8386706, 0.8480481, 0.8571673, 0.8660254, 0.8746197, 0.8829476, 0.8910065,
    0.8987940, 0.9063078, 0.9135455, 0.9205049, 0.9271839, 0.9335804, 0.9396926, 0.9455186,
    0.9510565, 0.9563048, 0.9612617, 0.9659258, 0.9702957, 0.9743701, 0.9781476, 0.9816272,
    0.9848078, 0.9876883, 0.9902681, 0.9925462, 0.9945219, 0.9961947, 0.9975641, 0.9986295,
    0.9993908, 0.9998477, 1.0000000,
];

/// OpenCV's `SinTable[deg]` for `deg` in `0..=450`.
fn sin_table(deg: i64) -> f32 {
    let d = deg as usize;
    match d {
        0..=90 => SIN_QUADRANT[d],
        91..=180 => SIN_QUADRANT[180 - d],
        181..=270 => -SIN_QUADRANT[d - 180],
        271..=360 => -SIN_QUADRANT[360 - d],
        _ => SIN_QUADRANT[d - 360],
    }
}

/// `cvRound` of a `double`: round half to even, saturated to `i32`.
fn cv_round(v: f64) -> i32 {
    v.round_ties_even() as i32
}

/// A colour component as OpenCV stores a `Scalar` value in an 8-bit image
/// (`saturate_cast<uchar>`: round half to even, then clamp to `0..=255`; NaN gives 0).
pub fn saturate_u8(v: f64) -> u8 {
    v.round_ties_even().clamp(0.0, 255.0) as u8
}

/// The `double` version of `cv::ellipse2Poly` (before the rounding to integer points).
pub fn ellipse2poly_f64(
    center: (f64, f64),
    axes: (f64, f64),
    angle: i32,
    arc_start: i32,
    arc_end: i32,
    delta: i32,
) -> Vec<(f64, f64)> {
    let mut angle = angle as i64;
    if angle < 0 {
        angle = angle.rem_euclid(360);
    } else if angle > 360 {
        angle = (angle - 1) % 360 + 1;
    }
    let (mut start, mut end) = (arc_start as i64, arc_end as i64);
    if start > end {
        std::mem::swap(&mut start, &mut end);
    }
    if start < 0 {
        let k = (-start + 359) / 360;
        start += 360 * k;
        end += 360 * k;
    }
    if end > 360 {
        let k = (end - 360 + 359) / 360;
        start -= 360 * k;
        end -= 360 * k;
    }
    if end - start > 360 {
        start = 0;
        end = 360;
    }
    let delta = (delta as i64).max(1);
    // sincos(angle): angle is already in 0..=360.
    let alpha = sin_table(450 - angle) as f64;
    let beta = sin_table(angle) as f64;
    let mut pts = Vec::new();
    let mut i = start;
    while i < end + delta {
        let mut a = i.min(end);
        if a < 0 {
            a += 360;
        }
        let x = axes.0 * sin_table(450 - a) as f64;
        let y = axes.1 * sin_table(a) as f64;
        pts.push((
            center.0 + x * alpha - y * beta,
            center.1 + x * beta + y * alpha,
        ));
        i += delta;
    }
    if pts.len() == 1 {
        pts = vec![center; 2];
    }
    pts
}

/// `cv2.ellipse2Poly(center, axes, angle, arc_start, arc_end, delta)`: the integer polygon
/// approximating an elliptic arc (see the module docs).
pub fn ellipse2poly(
    center: (i32, i32),
    axes: (i32, i32),
    angle: i32,
    arc_start: i32,
    arc_end: i32,
    delta: i32,
) -> Vec<(i32, i32)> {
    let fpts = ellipse2poly_f64(
        (center.0 as f64, center.1 as f64),
        (axes.0 as f64, axes.1 as f64),
        angle,
        arc_start,
        arc_end,
        delta,
    );
    let mut pts: Vec<(i32, i32)> = Vec::with_capacity(fpts.len());
    let mut prev = (i32::MIN, i32::MIN);
    for (x, y) in fpts {
        let p = (cv_round(x), cv_round(y));
        if p != prev {
            pts.push(p);
            prev = p;
        }
    }
    if pts.len() == 1 {
        pts = vec![center; 2];
    }
    pts
}

fn put<P: Pixel>(img: &mut Img<P>, x: i64, y: i64, color: P) {
    if x >= 0 && y >= 0 && x < img.width() as i64 && y < img.height() as i64 {
        img.put_pixel(x as u32, y as u32, color);
    }
}

/// `ICV_HLINE`: pixels `xl..=xr` of row `y` (callers clip to the image).
fn hline<P: Pixel>(img: &mut Img<P>, y: i64, xl: i64, xr: i64, color: P) {
    for x in xl..=xr {
        put(img, x, y, color);
    }
}

/// OpenCV's `Line2`: a line between 16.16 fixed-point points, clipped to the image.
fn line2<P: Pixel>(img: &mut Img<P>, pt1: (i64, i64), pt2: (i64, i64), color: P) {
    let (w, h) = (img.width() as i64, img.height() as i64);
    let Some((mut pt1, mut pt2)) = lines::clip_line(w << XY_SHIFT, h << XY_SHIFT, pt1, pt2) else {
        return;
    };
    let dx = pt2.0 - pt1.0;
    let dy = pt2.1 - pt1.1;
    let (ax, ay) = (dx.abs(), dy.abs());
    let (x_step, y_step, mut ecount);
    if ax > ay {
        let dy = if dx < 0 { -dy } else { dy };
        if dx < 0 {
            std::mem::swap(&mut pt1, &mut pt2);
        }
        x_step = XY_ONE;
        y_step = (dy << XY_SHIFT) / (ax | 1);
        ecount = (pt2.0 - pt1.0) >> XY_SHIFT;
    } else {
        let dx = if dy < 0 { -dx } else { dx };
        if dy < 0 {
            std::mem::swap(&mut pt1, &mut pt2);
        }
        x_step = (dx << XY_SHIFT) / (ay | 1);
        y_step = XY_ONE;
        ecount = (pt2.1 - pt1.1) >> XY_SHIFT;
    }
    pt1.0 += HALF;
    pt1.1 += HALF;
    put(
        img,
        (pt2.0 + HALF) >> XY_SHIFT,
        (pt2.1 + HALF) >> XY_SHIFT,
        color,
    );
    if ax > ay {
        let mut x = pt1.0 >> XY_SHIFT;
        let mut y = pt1.1;
        while ecount >= 0 {
            put(img, x, y >> XY_SHIFT, color);
            x += 1;
            y += y_step;
            ecount -= 1;
        }
    } else {
        let mut x = pt1.0;
        let mut y = pt1.1 >> XY_SHIFT;
        while ecount >= 0 {
            put(img, x >> XY_SHIFT, y, color);
            x += x_step;
            y += 1;
            ecount -= 1;
        }
    }
}

#[derive(Clone, Copy)]
struct Edge {
    idx: usize,
    di: usize,
    x: i64,
    dx: i64,
    ye: i64,
}

/// OpenCV's `FillConvexPoly` for `LINE_8`, with vertices in `shift`-bit fixed point
/// (`shift` is 0 or 16).
fn fill_convex_poly_shift<P: Pixel>(img: &mut Img<P>, v: &[(i64, i64)], color: P, shift: u32) {
    let npts = v.len();
    if npts == 0 {
        return;
    }
    let (w, h) = (img.width() as i64, img.height() as i64);
    let delta: i64 = (1i64 << shift) >> 1;
    let up = XY_SHIFT - shift;

    let mut p0 = v[npts - 1];
    p0 = (p0.0 << up, p0.1 << up);
    let (mut xmin, mut xmax, mut ymin, mut ymax) = (v[0].0, v[0].0, v[0].1, v[0].1);
    let mut imin = 0usize;
    for (i, &q) in v.iter().enumerate() {
        if q.1 < ymin {
            ymin = q.1;
            imin = i;
        }
        ymax = ymax.max(q.1);
        xmax = xmax.max(q.0);
        xmin = xmin.min(q.0);
        let p = (q.0 << up, q.1 << up);
        if shift == 0 {
            let a = ((p0.0 >> XY_SHIFT) as i32, (p0.1 >> XY_SHIFT) as i32);
            let b = ((p.0 >> XY_SHIFT) as i32, (p.1 >> XY_SHIFT) as i32);
            lines::draw_line(img, a, b, color);
        } else {
            line2(img, p0, p, color);
        }
        p0 = p;
    }

    let xmin = (xmin + delta) >> shift;
    let xmax = (xmax + delta) >> shift;
    let ymin = (ymin + delta) >> shift;
    let ymax = (ymax + delta) >> shift;
    if npts < 3 || xmax < 0 || ymax < 0 || xmin >= w || ymin >= h {
        return;
    }
    let ymax = ymax.min(h - 1);
    let start = Edge {
        idx: imin,
        di: 1,
        x: -XY_ONE,
        dx: 0,
        ye: ymin,
    };
    let mut edge = [
        start,
        Edge {
            di: npts - 1,
            ..start
        },
    ];
    let mut edges = npts as i64;
    let mut y = ymin;
    loop {
        for e in edge.iter_mut() {
            if y < e.ye {
                continue;
            }
            let mut idx0 = e.idx;
            let mut idx = idx0 + e.di;
            if idx >= npts {
                idx -= npts;
            }
            loop {
                let more = edges > 0;
                edges -= 1;
                if !more {
                    break;
                }
                let ty = (v[idx].1 + delta) >> shift;
                if ty > y {
                    let xs = v[idx0].0 << up;
                    let xe = v[idx].0 << up;
                    e.ye = ty;
                    e.dx = ((xe - xs) * 2 + (ty - y)) / (2 * (ty - y));
                    e.x = xs;
                    e.idx = idx;
                    break;
                }
                idx0 = idx;
                idx += e.di;
                if idx >= npts {
                    idx -= npts;
                }
            }
        }
        if edges < 0 {
            break;
        }
        if y >= 0 {
            let (l, r) = if edge[0].x > edge[1].x {
                (1, 0)
            } else {
                (0, 1)
            };
            let mut x1 = (edge[l].x + HALF) >> XY_SHIFT;
            let mut x2 = (edge[r].x + HALF) >> XY_SHIFT;
            if x2 >= 0 && x1 < w {
                x1 = x1.max(0);
                x2 = x2.min(w - 1);
                hline(img, y, x1, x2, color);
            }
        }
        edge[0].x += edge[0].dx;
        edge[1].x += edge[1].dx;
        y += 1;
        if y > ymax {
            break;
        }
        // Rows above the image where no edge ends: OpenCV steps through them one by one doing
        // nothing but advancing x; jump to the first row where something happens.
        if y < 0 {
            let target = edge[0].ye.min(edge[1].ye).min(0);
            if target > y {
                let k = target - y;
                edge[0].x += edge[0].dx * k;
                edge[1].x += edge[1].dx * k;
                y = target;
            }
        }
    }
}

/// `cv2.fillConvexPoly(img, pts, color)` (`lineType = LINE_8`, `shift = 0`), exactly as
/// OpenCV fills it — including its result for non-convex input, which is not a proper fill.
pub fn fill_convex_poly<P: Pixel>(img: &mut Img<P>, pts: &[(i32, i32)], color: P) {
    let v: Vec<(i64, i64)> = pts.iter().map(|&(x, y)| (x as i64, y as i64)).collect();
    fill_convex_poly_shift(img, &v, color, 0);
}

fn circle_i64<P: Pixel>(img: &mut Img<P>, center: (i64, i64), radius: i64, color: P, fill: bool) {
    if radius < 0 {
        return;
    }
    let (w, h) = (img.width() as i64, img.height() as i64);
    let (cx, cy) = center;
    let (mut err, mut dx, mut dy, mut plus, mut minus) = (0i64, radius, 0i64, 1i64, 2 * radius - 1);
    let inside = cx >= radius && cx < w - radius && cy >= radius && cy < h - radius;
    let rows = |img: &mut Img<P>, ya: i64, yb: i64, xa: i64, xb: i64| {
        for y in [ya, yb] {
            if fill {
                hline(img, y, xa, xb, color);
            } else {
                put(img, xa, y, color);
                put(img, xb, y, color);
            }
        }
    };
    while dx >= dy {
        let (y11, y12, y21, y22) = (cy - dy, cy + dy, cy - dx, cy + dx);
        let (mut x11, mut x12, mut x21, mut x22) = (cx - dx, cx + dx, cx - dy, cx + dy);
        if inside {
            rows(img, y11, y12, x11, x12);
            rows(img, y21, y22, x21, x22);
        } else if x11 < w && x12 >= 0 && y21 < h && y22 >= 0 {
            if fill {
                x11 = x11.max(0);
                x12 = x12.min(w - 1);
            }
            for y in [y11, y12] {
                if (0..h).contains(&y) {
                    if fill {
                        hline(img, y, x11, x12, color);
                    } else {
                        put(img, x11, y, color);
                        put(img, x12, y, color);
                    }
                }
            }
            if x21 < w && x22 >= 0 {
                if fill {
                    x21 = x21.max(0);
                    x22 = x22.min(w - 1);
                }
                for y in [y21, y22] {
                    if (0..h).contains(&y) {
                        if fill {
                            hline(img, y, x21, x22, color);
                        } else {
                            put(img, x21, y, color);
                            put(img, x22, y, color);
                        }
                    }
                }
            }
        }
        dy += 1;
        err += plus;
        plus += 2;
        let mask: i64 = if err <= 0 { 0 } else { -1 };
        err -= minus & mask;
        dx += mask;
        minus -= mask & 2;
    }
}

/// `cv2.circle(img, center, radius, color, thickness)` with `thickness = -1` (`filled`) or
/// `thickness = 1` (`!filled`), `LINE_8`, `shift = 0`: OpenCV's own midpoint circle.
pub fn circle<P: Pixel>(img: &mut Img<P>, center: (i32, i32), radius: i32, color: P, filled: bool) {
    circle_i64(
        img,
        (center.0 as i64, center.1 as i64),
        radius as i64,
        color,
        filled,
    );
}

/// `cv2.line(img, p0, p1, color, thickness)` (`LINE_8`, `shift = 0`): thickness 1 is the
/// Bresenham line of [`crate::lines`], thicker lines a filled quadrilateral with round caps
/// (see the module docs).
pub fn line<P: Pixel>(img: &mut Img<P>, p0: (i32, i32), p1: (i32, i32), color: P, thickness: i32) {
    let thickness = thickness.clamp(1, 32767) as i64;
    if thickness == 1 {
        lines::draw_line(img, p0, p1, color);
        return;
    }
    // OpenCV ≥ 4.13 first clips the segment to the image grown by `thickness` on every side
    // (`clipLine` on integer points), so that far-away endpoints cost nothing; the caps stay
    // outside the image. A segment entirely outside draws nothing.
    let (w, h) = (img.width() as i64, img.height() as i64);
    let m = thickness;
    let shifted = |p: (i32, i32)| (p.0 as i64 + m, p.1 as i64 + m);
    let Some((a, b)) = lines::clip_line(w + 2 * m, h + 2 * m, shifted(p0), shifted(p1)) else {
        return;
    };
    let mut p0 = ((a.0 - m) << XY_SHIFT, (a.1 - m) << XY_SHIFT);
    let p1 = ((b.0 - m) << XY_SHIFT, (b.1 - m) << XY_SHIFT);
    const INV_XY_ONE: f64 = 1.0 / XY_ONE as f64;
    let dx = (p0.0 - p1.0) as f64 * INV_XY_ONE;
    let dy = (p1.1 - p0.1) as f64 * INV_XY_ONE;
    let r = dx * dx + dy * dy;
    let odd = thickness & 1;
    let t = thickness << (XY_SHIFT - 1);
    if r.abs() > f64::EPSILON {
        let r = (t as f64 + (odd * XY_ONE) as f64 * 0.5) / r.sqrt();
        let dpx = cv_round(dy * r) as i64;
        let dpy = cv_round(dx * r) as i64;
        let pt = [
            (p0.0 + dpx, p0.1 + dpy),
            (p0.0 - dpx, p0.1 - dpy),
            (p1.0 - dpx, p1.1 - dpy),
            (p1.0 + dpx, p1.1 + dpy),
        ];
        fill_convex_poly_shift(img, &pt, color, XY_SHIFT);
    }
    let radius = (t + HALF) >> XY_SHIFT;
    for _ in 0..2 {
        let c = ((p0.0 + HALF) >> XY_SHIFT, (p0.1 + HALF) >> XY_SHIFT);
        circle_i64(img, c, radius, color, true);
        p0 = p1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sin_table_symmetry() {
        assert_eq!(sin_table(90), 1.0);
        assert_eq!(sin_table(180), 0.0);
        assert_eq!(sin_table(270), -1.0);
        assert_eq!(sin_table(450), 1.0);
        assert_eq!(sin_table(210), -0.5);
        assert_eq!(sin_table(390), 0.5);
    }

    #[test]
    fn rounding() {
        assert_eq!(cv_round(2.5), 2);
        assert_eq!(cv_round(3.5), 4);
        assert_eq!(cv_round(-2.5), -2);
        assert_eq!(saturate_u8(76.5), 76);
        assert_eq!(saturate_u8(300.0), 255);
        assert_eq!(saturate_u8(-3.0), 0);
    }

    #[test]
    fn degenerate_ellipse() {
        assert_eq!(ellipse2poly((5, 6), (0, 0), 0, 0, 360, 1), vec![(5, 6); 2]);
    }
}
