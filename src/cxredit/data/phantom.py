"""Procedural frontal (PA) chest radiographs with ground truth: the built-in phantoms.

A *subject* is a seeded set of anatomical and film parameters (`Subject`); the heart is a
separate parameter, `heart_scale`, so ``render(subject, 1.0)`` and ``render(subject, 1.4)``
are the same patient with a normal and an enlarged heart: a true counterfactual. Every
image comes with heart / right-lung / left-lung masks and its cardiothoracic ratio.

Geometry lives in an *anatomical frame*: X to the image right (= patient's left), Y down,
both in units of half the image side (so the image spans [-1, 1]; 1 unit ~ 20 cm). A pose
(rotation, scale, shift) maps it to the image. Each structure is an analytic field (ellipses,
parabolic domes, periodic rib bands in a curved coordinate), which keeps rendering at a few
milliseconds per 128 px image and lets `subject_ctr` compute the CTR from the parameters.

Rendering is physically flavoured: the body is a soft-tissue slab whose depth the lungs
partly replace with air (and the heart displaces lung), bones/vessels/devices add their own
attenuation, and the transmitted fraction T = exp(-sum mu*t) is blurred, gets
Poisson-like noise and is shown as 1 - T (MONOCHROME2: lungs dark, bones bright).
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np
from scipy.optimize import brentq

try:  # the clip ufunc itself: np.clip's Python layers cost more than its work on 128 px maps
    from numpy._core.umath import clip as _clip  # numpy >= 2
except ImportError:  # pragma: no cover (numpy 1.x)
    from numpy.core.umath import clip as _clip

MASK_NAMES = ("heart", "right_lung", "left_lung")  # order of the mask channels
CARDIOMEGALY_CTR = 0.5  # label threshold: cardiomegaly if CTR > 0.5
HEALTHY_CTR_RANGE = (0.38, 0.48)
CARDIOMEGALY_CTR_RANGE = (0.52, 0.65)
DEVICE_PROBS = (0.05, 0.3)  # pacemaker probability for (healthy, cardiomegaly): the confounder

# Random streams derived from the subject seed; one per purpose so that, e.g., drawing the
# device or the target CTR never shifts the anatomy of a seed.
_ANATOMY, _DEVICE, _VESSELS, _CASE, _NOISE = range(5)


@dataclass(frozen=True, eq=False)
class Subject:
    """One phantom patient: everything but the heart size. Lengths in anatomical units.

    Draw one with `sample_subject`; change a field with `dataclasses.replace` (the vessel
    tree and pacemaker wire are derived once at sampling time and are not re-derived).
    """

    seed: int
    sex: str  # "M" or "F"
    device: bool  # pacemaker present
    # pose: image = scale * rot(rotation) @ anatomy + shift
    rotation: float  # radians
    scale: float
    shift_x: float
    shift_y: float
    # thorax
    thorax_hw: float  # inner rib-cage half-width at its widest (W)
    cage_top: float  # Y where the rib-cage arch closes
    cage_round: float  # 1 = elliptical arch, lower = squarer shoulders
    apex_y: float  # lung apex height
    apex_k: float  # curvature of the apical dome
    dome_r: float  # Y of the right hemidiaphragm peak (image left)
    dome_drop: float  # how much lower the left dome is (0.075-0.125 ~ 1.5-2.5 cm)
    dome_c2: float  # dome curvature (quadratic), sets the costophrenic depth
    dome_c4: float  # quartic term: sharpens the costophrenic angles
    med_lo: float  # mediastinal half-width at heart level (lungs reach the spine there)
    med_up_r: float  # upper mediastinum, right (SVC) border
    med_up_l: float  # upper mediastinum, left border
    knob: tuple[float, float, float, float]  # aortic knob ellipse: cx, cy, a, b
    spine_hw: float
    vert_period: float  # vertebral body + disc height
    vert_phase: float
    body_margin: float  # soft tissue outside the ribs
    body_depth: float  # mu * AP depth of soft tissue at the midline
    lung_air: float  # fraction of that depth replaced by air in the lungs
    # nominal heart (heart_scale = 1): LV ellipse (cx, cy, a, b, tilt) + RA ellipse
    lv: tuple[float, float, float, float, float]
    ra: tuple[float, float, float, float]
    heart_density: float  # extra attenuation of the heart over the mediastinum
    # bones and soft tissue
    ribs_above_dome: float  # posterior ribs above the right dome (9-10.5)
    rib_alpha: float  # downward curvature of posterior ribs
    rib_width: float  # rib height as a fraction of the rib period
    rib_mu: float
    clav_y: float
    clav_rise: float
    scapula: float  # 0 = scapulae rotated out of the lung fields
    breast: float  # breast shadow strength (0 for men)
    bubble: float  # gastric air bubble under the left dome (0 = none)
    # film
    mu_scale: float  # beam quality: global attenuation scale
    gamma: float
    lo: float
    hi: float
    photons: float  # quanta per pixel at 128 px: sets the noise level
    blur: float  # PSF sigma in pixels at 128 px
    collimation: tuple[float, float, float, float]  # left, right, top, bottom (image fraction)
    coll_value: float  # grey level of collimated borders (bright or dark)
    vessels: np.ndarray = field(repr=False)  # [K,3] float32: X, Y, weight of vessel samples
    wire: np.ndarray = field(repr=False)  # [K,2] float32: pacemaker lead samples (K=0: none)

    @property
    def dome_l(self) -> float:
        return self.dome_r + self.dome_drop

    @property
    def carina_y(self) -> float:
        return self.dome_r - 0.55

    @property
    def heart_anchor_y(self) -> float:
        """Y about which the heart grows: its base on the left dome."""
        return self.dome_l - 0.02

    @property
    def midline_y(self) -> float:
        """Height at which the spine's image column defines the midline (heart level)."""
        return self.lv[1]


@dataclass
class PhantomImage:
    """A rendered phantom.

    Attributes:
        image: float32 [R,R] in [0,1], higher = brighter = more attenuation.
        masks: bool [3,R,R] in `MASK_NAMES` order. Lung masks are the visible lung fields:
            the part of a lung behind the heart is excluded (it belongs to the heart mask).
        midline_x: spine centre at heart level, in pixel units (pixel j spans [j, j+1]).
        heart_scale: the heart size rendered.
        ctr: CTR derived from the parameters (`subject_ctr`): the ground truth.
        subject: the subject rendered.
    """

    image: np.ndarray
    masks: np.ndarray
    midline_x: float
    heart_scale: float
    ctr: float
    subject: Subject

    @property
    def mask_ctr(self) -> float:
        """CTR measured on the masks (`ctr_from_masks`)."""
        return ctr_from_masks(self.masks, self.midline_x)


# --------------------------------------------------------------------------- sampling
def sample_subject(seed: int, *, device: bool | None = None, device_prob: float = 0.1,
                   sex: str | None = None) -> Subject:
    """Draw a subject from its seed (independent streams for anatomy, device, vessels).

    Args:
        seed: non-negative integer; the only source of randomness.
        device: force a pacemaker on/off; None draws it with probability `device_prob`.
        device_prob: pacemaker probability when `device` is None.
        sex: force "M"/"F"; None draws it.
    """
    if seed < 0:
        raise ValueError(f"seed must be non-negative, got {seed}")
    g = np.random.default_rng([seed, _ANATOMY])
    u = g.uniform
    sex = sex or ("F" if g.random() < 0.5 else "M")
    if sex not in ("M", "F"):
        raise ValueError(f"sex must be 'M' or 'F', got {sex!r}")
    if device is None:
        device = bool(np.random.default_rng([seed, _DEVICE]).random() < device_prob)
    W = u(0.75, 0.84) - (0.02 if sex == "F" else 0.0)
    dome_r, dome_drop, med_lo = u(0.26, 0.36), u(0.075, 0.125), u(0.115, 0.13)
    # The nominal heart scales with the thorax so that heart_scale = 1 is a normal heart
    # (CTR ~0.40-0.46) for every subject; the LV reaches ~0.6 W left of the midline, the RA
    # ~0.3 W right of it (1/3 : 2/3 of the heart's width).
    lv_a, lv_b, tilt = W * u(0.45, 0.52), W * u(0.33, 0.38), math.radians(u(30, 42))
    lv_cx = W * u(0.56, 0.62) - math.hypot(lv_a * math.cos(tilt), lv_b * math.sin(tilt))
    lv_cy = dome_r + dome_drop - u(0.19, 0.23)
    ra_a, ra_b = W * u(0.14, 0.17), W * u(0.20, 0.25)
    ra_cx = W * u(0.27, 0.31) - ra_a
    coll = tuple(u(0.01, 0.05) if g.random() < 0.35 else 0.0 for _ in range(4))
    params = dict(
        seed=int(seed), sex=sex, device=bool(device),
        rotation=math.radians(u(-2.5, 2.5)), scale=u(0.95, 1.04),
        shift_x=u(-0.04, 0.04), shift_y=u(-0.03, 0.05),
        thorax_hw=W, cage_top=u(-1.12, -1.02), cage_round=u(0.35, 0.8),
        apex_y=u(-0.84, -0.76), apex_k=u(0.9, 1.4), dome_r=dome_r, dome_drop=dome_drop,
        dome_c2=u(0.30, 0.45), dome_c4=u(0.3, 0.8), med_lo=med_lo,
        med_up_r=med_lo + u(0.03, 0.06), med_up_l=med_lo + u(0.01, 0.04),
        knob=(u(0.13, 0.16), dome_r - u(0.60, 0.66), u(0.065, 0.085), u(0.05, 0.065)),
        spine_hw=u(0.085, 0.10), vert_period=u(0.105, 0.12), vert_phase=u(0, 1),
        body_margin=u(0.10, 0.22), body_depth=u(1.6, 1.9), lung_air=u(0.80, 0.88),
        lv=(lv_cx, lv_cy, lv_a, lv_b, tilt), ra=(-ra_cx, dome_r - u(0.10, 0.14), ra_a, ra_b),
        heart_density=u(0.03, 0.08), ribs_above_dome=u(9.0, 10.5), rib_alpha=u(0.35, 0.55),
        rib_width=u(0.36, 0.46), rib_mu=u(0.20, 0.30), clav_y=u(-0.70, -0.62),
        clav_rise=u(0.04, 0.12), scapula=u(0.5, 1.0) if g.random() < 0.6 else 0.0,
        breast=u(0.18, 0.32) if sex == "F" else 0.0,
        bubble=u(0.4, 1.0) if g.random() < 0.7 else 0.0,
        mu_scale=u(0.88, 1.15), gamma=u(0.9, 1.45), lo=u(0.0, 0.06), hi=u(0.9, 1.0),
        photons=math.exp(u(math.log(800), math.log(6000))), blur=u(0.5, 0.9),
        collimation=coll, coll_value=u(0.85, 1.0) if g.random() < 0.5 else u(0.0, 0.06),
    )
    proto = Subject(**params, vessels=np.zeros((0, 3), np.float32),
                    wire=np.zeros((0, 2), np.float32))
    vessels = _vessel_tree(proto, np.random.default_rng([seed, _VESSELS]))
    return Subject(**params, vessels=vessels, wire=_pacemaker_wire(proto) if device else proto.wire)


def sample_case(seed: int, cardiomegaly: bool, device_prob_healthy: float = DEVICE_PROBS[0],
                device_prob_cardio: float = DEVICE_PROBS[1]) -> tuple[Subject, float]:
    """Draw a subject and a heart size whose CTR is uniform in the label's range.

    Healthy cases get CTR ~ U(0.38, 0.48), cardiomegaly U(0.52, 0.65). The pacemaker is
    drawn with the label's probability from one uniform per seed, so a seed that has a
    device when healthy also has it with cardiomegaly (the confounder is monotone).

    Returns:
        (subject, heart_scale) with subject_ctr(subject, heart_scale) equal to the target.
    """
    p = device_prob_cardio if cardiomegaly else device_prob_healthy
    subject = sample_subject(seed, device_prob=p)
    lo, hi = CARDIOMEGALY_CTR_RANGE if cardiomegaly else HEALTHY_CTR_RANGE
    target = np.random.default_rng([seed, _CASE]).uniform(lo, hi)
    return subject, heart_scale_for_ctr(subject, float(target))


_TRUNK_SIDE = np.repeat([-1.0, 1.0], 7)  # vessel trunks: 7 per lung ...
_TRUNK_BASE = np.tile([-85.0, -55, -25, 5, 35, 60, 85], 2)  # ... at these angles (degrees)
_TURN_SIGN = np.array([1.0, -1.0])  # the two daughters of a branch turn opposite ways


def _vessel_tree(s: Subject, rng: np.random.Generator) -> np.ndarray:
    """Sample points of a pulmonary vessel tree in both lungs: [K,3] = (X, Y, weight).

    Seven trunks leave each hilum and bifurcate four times; each generation is shorter and
    thinner (weight ~ cross-section), so markings thin out towards the periphery. Points
    outside the lung fields are dropped (they would vanish in the mediastinum anyway).
    Points and directions are complex numbers (X + iY): a branch turns by a multiplication.
    """
    side, base = _TRUNK_SIDE, _TRUNK_BASE
    rnd = rng.random((5, 14 * 16, 5))  # all randomness at once: [generation, segment, use]
    ang = np.deg2rad(base + 28 * (rnd[0, :14, 0] - 0.5))
    # Trunks leave along the hilum (upper ones higher), not from one point: no starburst.
    start = (side * (s.med_lo + 0.05 + 0.03 * rnd[0, :14, 1])
             + 1j * (s.dome_r - 0.40 - 0.03 * (side > 0) + base / 85.0 * 0.07))
    dirs = side * np.cos(ang) + 1j * np.sin(ang)
    length = 0.08 + 0.04 * rnd[0, :14, 2]
    weight = 0.6 + 0.15 * base / 85.0  # lower-lobe vessels are larger (gravity)
    # Branch turns and shortenings of generations 0-3 in one go (generation g has 14 * 2**g
    # segments and uses the first rows of rnd[g]; the last one does not branch): a few
    # array ops instead of many tiny ones.
    r = np.concatenate([rnd[g, :14 << g] for g in range(4)])
    turns = np.exp(1j * (np.deg2rad(15 + 20 * r[:, :2]) * _TURN_SIGN + 0.2 * (r[:, 2:4] - 0.5)))
    shrink = 0.65 + 0.2 * r[:, 4]
    pts, wts = [], []
    for g in range(5):
        seg = dirs * length
        k = len(start)
        n = max(2, math.ceil(float(length.sum()) / k / 0.012))  # ~0.8 px apart at 128 px
        pts.append((start[:, None] + ((np.arange(n) + 0.5) / n) * seg[:, None]).ravel())
        wts.append(np.repeat(weight * length / n, n))
        if g == 4:
            break
        used = slice(k - 14, 2 * k - 14)  # this generation's rows of turns / shrink
        dirs = (dirs[:, None] * turns[used]).ravel()
        start = np.repeat(start + seg, 2)
        length = np.repeat(length * shrink[used], 2)
        weight = np.repeat(weight, 2) * 0.7
    p, w = np.concatenate(pts), np.concatenate(wts)
    v = np.stack([p.real, p.imag, w], 1).astype(np.float32)
    inside = _lung_dist(s, np.abs(v[:, 0]), v[:, 1], (v[:, 0] > 0).astype(np.float32)) > 0
    return v[inside]


def _pacemaker_wire(s: Subject) -> np.ndarray:
    """Lead from the generator (left upper chest) via the SVC and right atrium to the RV apex.

    The tip sits near the heart's base so it stays inside the heart at any heart_scale.
    """
    W, gx, gy = s.thorax_hw, 0.62 * s.thorax_hw, s.clav_y + 0.16
    ctrl = np.array([[gx - 0.06, gy], [0.25 * W, s.clav_y + 0.07], [-0.08, s.carina_y + 0.05],
                     [-0.13, s.ra[1] - 0.05], [0.0, s.dome_l - 0.10], [0.16, s.dome_l - 0.10]])
    # Catmull-Rom spline through the control points: a smooth wire without a spline library.
    p = np.concatenate([ctrl[:1], ctrl, ctrl[-1:]])
    t = np.linspace(0, 1, 60, endpoint=False)[:, None]
    segs = []
    for i in range(1, len(p) - 2):
        p0, p1, p2, p3 = p[i - 1], p[i], p[i + 1], p[i + 2]
        segs.append(0.5 * (2 * p1 + (p2 - p0) * t + (2 * p0 - 5 * p1 + 4 * p2 - p3) * t**2
                           + (3 * p1 - p0 - 3 * p2 + p3) * t**3))
    return np.concatenate(segs).astype(np.float32)


# --------------------------------------------------------------------------- geometry
# All field functions take arrays of any float dtype and use Python-float constants only, so
# float32 grids stay float32 (float64 exp/sqrt cost several times more per image).
def _to_image(s: Subject, X: np.ndarray, Y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    c, n = math.cos(s.rotation) * s.scale, math.sin(s.rotation) * s.scale
    return c * X - n * Y + s.shift_x, n * X + c * Y + s.shift_y


def _to_anatomy(s: Subject, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    c, n = math.cos(s.rotation) / s.scale, math.sin(s.rotation) / s.scale
    x, y = x - s.shift_x, y - s.shift_y
    return c * x + n * y, c * y - n * x


def _wall(s: Subject, Y: np.ndarray) -> np.ndarray:
    """Inner rib-cage half-width at height Y: a squared-off arch, vertical below its widest."""
    widest = s.dome_r - 0.08
    t = _clip((widest - Y) * (1.0 / (widest - s.cage_top)), 0.0, 1.0)
    t2 = t * t
    return s.thorax_hw * np.sqrt(1.0 - t2 * (s.cage_round + (1.0 - s.cage_round) * t2))


def _dome(s: Subject, ax: np.ndarray, lf: np.ndarray | float) -> np.ndarray:
    """Hemidiaphragm height at |X| = ax (lf = 1 on the left side, 0 on the right).

    The peak lies at 40% of W; the costophrenic angle (lowest, sharp) at the lateral wall.
    """
    u = (ax - 0.4 * s.thorax_hw) * (1.0 / s.thorax_hw)
    u2 = u * u
    return s.dome_r + s.dome_drop * lf + u2 * (s.dome_c2 + s.dome_c4 * u2)


def _diaphragm(s: Subject, X: np.ndarray) -> np.ndarray:
    """One diaphragm line across the body (the domes blended over the spine): clips the heart."""
    w = _clip(0.5 + X * 5.0, 0.0, 1.0)
    return _dome(s, np.abs(X), w)


def _lung_dist(s: Subject, ax: np.ndarray, Y: np.ndarray, lf: np.ndarray) -> np.ndarray:
    """Approximate signed distance to the lung fields (> 0 inside), both lungs at once.

    A lung is the region inside the rib cage, outside the mediastinum, below the apical
    dome and above its hemidiaphragm; the aortic knob bulges into the left one (lf = 1).
    """
    # Above the heart the mediastinum widens into the vascular pedicle, hiding the heart's top.
    up = _clip((s.carina_y + 0.12 - Y) * 12.5 + 0.5, 0.0, 1.0)
    med = s.med_lo + (s.med_up_r - s.med_lo + (s.med_up_l - s.med_up_r) * lf) * up
    d = np.minimum(_wall(s, Y) - ax, ax - med)
    apex = (ax - 0.45 * s.thorax_hw) * (1.0 / s.thorax_hw)
    d = np.minimum(d, Y - s.apex_y - s.apex_k * apex * apex)
    d = np.minimum(d, 0.8 * (_dome(s, ax, lf) - Y))
    kx, ky, ka, kb = s.knob
    kx_, ky_ = (ax - kx) * (1.0 / ka), (Y - ky) * (1.0 / kb)
    knob = (np.sqrt(kx_ * kx_ + ky_ * ky_) - 1.0) * kb + 10.0 * (1.0 - lf)  # left side only
    return np.minimum(d, knob)


def _heart_radius2(s: Subject, X: np.ndarray, Y: np.ndarray, heart_scale: float) -> np.ndarray:
    """Squared normalised radius of the heart (union of LV and RA ellipses; < 1 inside).

    heart_scale stretches the nominal heart about (midline, base): fully in width, 40% as
    much in height, as an enlarging heart mostly broadens and lifts its apex.
    """
    ya, sv = s.heart_anchor_y, 1.0 + 0.4 * (heart_scale - 1.0)
    Xn, Yn = X * (1.0 / heart_scale), ya + (Y - ya) * (1.0 / sv)
    cx, cy, a, b, t = s.lv
    dx, dy = Xn - cx, Yn - cy
    c, n = math.cos(t), math.sin(t)
    u, v = (dx * c + dy * n) * (1.0 / a), (dy * c - dx * n) * (1.0 / b)
    rx, ry, ra, rb = s.ra
    p, q = (Xn - rx) * (1.0 / ra), (Yn - ry) * (1.0 / rb)
    return np.minimum(u * u + v * v, p * p + q * q)


# --------------------------------------------------------------------------- CTR
_COS = np.cos(np.linspace(0, 2 * np.pi, 2048, endpoint=False))  # heart outline samples
_SIN = np.sin(np.linspace(0, 2 * np.pi, 2048, endpoint=False))


def subject_ctr(subject: Subject, heart_scale: float = 1.0) -> float:
    """CTR derived from the parameters (the ground truth), with the pose applied.

    Heart extents come from densely sampled ellipse outlines clipped at the diaphragm, the
    thoracic width from the rib-cage walls compared row by row in the image, as
    `ctr_from_masks` measures them. Independent of resolution.
    """
    return _ctr(subject, heart_scale, _thoracic_width(subject))


def _heart_extent(s: Subject, h: float) -> tuple[float, float]:
    """Leftmost and rightmost image x (normalised) of the heart at scale h.

    Each ellipse maps (heart scaling, then pose) to an ellipse x(t) = xc + A cos t + B sin t,
    whose extremes xc -+ hypot(A, B) are closed-form. They are exact unless the extreme
    point lies below the diaphragm (hidden, and not in the mask); then the clipped outline
    is sampled densely instead.
    """
    ya, sv = s.heart_anchor_y, 1.0 + 0.4 * (h - 1.0)
    c, n = math.cos(s.rotation) * s.scale, math.sin(s.rotation) * s.scale
    cx, cy, a, b, t = s.lv
    rx, ry, ra, rb = s.ra
    ct, st = math.cos(t), math.sin(t)
    lo, hi = [], []
    for ex, ey, ux, uy, vx, vy in ((cx, cy, a * ct, a * st, -b * st, b * ct),
                                   (rx, ry, ra, 0.0, 0.0, rb)):
        # anatomical centre and axis vectors after heart scaling; then image x components
        X0, Y0 = ex * h, ya + (ey - ya) * sv
        A, B = c * ux * h - n * uy * sv, c * vx * h - n * vy * sv
        xc, r, t0 = c * X0 - n * Y0 + s.shift_x, math.hypot(A, B), math.atan2(B, A)
        for sign, out in ((1.0, hi), (-1.0, lo)):
            Xe = X0 + sign * (ux * math.cos(t0) + vx * math.sin(t0)) * h
            Ye = Y0 + sign * (uy * math.cos(t0) + vy * math.sin(t0)) * sv
            below = min(max(0.5 + 5.0 * Xe, 0.0), 1.0)  # _diaphragm, in scalar arithmetic
            out.append((xc + sign * r, Ye < _dome(s, abs(Xe), below)))
    xmin, ok_min = min(lo)
    xmax, ok_max = max(hi)
    if ok_min and ok_max:
        return xmin, xmax
    Xn = np.concatenate([cx + a * ct * _COS - b * st * _SIN, rx + ra * _COS])
    Yn = np.concatenate([cy + a * st * _COS + b * ct * _SIN, ry + rb * _SIN])
    X, Y = Xn * h, ya + (Yn - ya) * sv
    keep = Y < _diaphragm(s, X)  # the part below the diaphragm is not seen (nor masked)
    x, _ = _to_image(s, X[keep], Y[keep])
    return float(x.min()), float(x.max())


def _ctr(s: Subject, heart_scale: float, width: float) -> float:
    h = float(heart_scale)
    if h <= 0:
        raise ValueError(f"heart_scale must be positive, got {h}")
    x0, x1 = _heart_extent(s, h)
    mid = _midline(s)
    return (max(mid - x0, 0.0) + max(x1 - mid, 0.0)) / width


def _midline(s: Subject) -> float:
    """Image x (normalised) of the spine axis at heart level."""
    return _to_image(s, 0.0, s.midline_y)[0]


def _thoracic_width(s: Subject) -> float:
    """Greatest row-wise distance between the lateral lung edges in the image (normalised).

    Memoised per subject object (root finding evaluates the CTR many times); a subject
    made with `dataclasses.replace` is a new object, so it is never served a stale width.
    """
    if s in _WIDTHS:
        return _WIDTHS[s]
    Y = np.linspace(s.cage_top, 1.2, 800)
    ax = _wall(s, Y)
    # wall points that bound the lung, both sides in one call (lf = 0 right, 1 left)
    n = len(Y)
    ok2 = _lung_dist(s, np.tile(ax - 1e-9, 2), np.tile(Y, 2), np.repeat([0.0, 1.0], n)) > -1e-6
    walls = []
    for lf, ok in ((0.0, ok2[:n]), (1.0, ok2[n:])):
        x, y = _to_image(s, ax[ok] if lf else -ax[ok], Y[ok])
        o = np.argsort(y)
        walls.append((x[o], y[o]))
    (xr, yr), (xl, yl) = walls
    ys = np.linspace(max(yr[0], yl[0]), min(yr[-1], yl[-1]), 1000)
    _WIDTHS[s] = width = float(np.max(np.interp(ys, yl, xl) - np.interp(ys, yr, xr)))
    return width


_WIDTHS: weakref.WeakKeyDictionary[Subject, float] = weakref.WeakKeyDictionary()


def heart_scale_for_ctr(subject: Subject, target_ctr: float) -> float:
    """The heart_scale at which `subject_ctr` equals `target_ctr` (monotone; root finding)."""
    width = _thoracic_width(subject)

    def f(h: float) -> float:
        return _ctr(subject, h, width) - target_ctr

    # The CTR is nearly proportional to heart_scale: a tight bracket around the proportional
    # guess saves most root-finding steps; fall back to the full range if it misses.
    guess = target_ctr / _ctr(subject, 1.0, width)
    lo, hi = 0.98 * guess, 1.02 * guess
    if not (0.4 <= lo and hi <= 2.0 and f(lo) <= 0.0 <= f(hi)):
        lo, hi = 0.4, 2.0  # beyond, the heart would reach the chest wall
        if not f(lo) <= 0.0 <= f(hi):
            raise ValueError(f"target CTR {target_ctr} outside [{f(lo) + target_ctr:.3f}, "
                             f"{f(hi) + target_ctr:.3f}] reachable for this subject")
    return float(brentq(f, lo, hi, xtol=1e-6))


def ctr_from_masks(masks: np.ndarray, midline_x: float) -> float:
    """CTR = (MRD + MLD) / ID measured on masks.

    Args:
        masks: [3,R,R] bool/uint8 in `MASK_NAMES` order (heart, right lung, left lung).
        midline_x: spine centre in pixel units (pixel j spans [j, j+1]).

    Returns:
        MRD = midline - left edge of the heart (patient's right), MLD = right edge - midline,
        ID = max over rows with both lungs of (left lung's outer edge - right lung's outer
        edge). NaN when the heart or a lung is missing.
    """
    masks = np.asarray(masks)
    if masks.ndim != 3 or masks.shape[0] != 3:
        raise ValueError(f"masks must be [3,R,R] (heart, right_lung, left_lung), got {masks.shape}")
    heart, right, left = (m.astype(bool, copy=False) for m in masks)
    cols = np.flatnonzero(heart.any(0))
    both = right.any(1) & left.any(1)
    if cols.size == 0 or not both.any():
        return float("nan")
    mrd = max(midline_x - cols[0], 0.0)
    mld = max(cols[-1] + 1 - midline_x, 0.0)
    R = masks.shape[-1]
    r_edge = np.argmax(right[both], 1)  # first column of the right lung per row
    l_edge = R - np.argmax(left[both][:, ::-1], 1)  # one past its last column
    return float((mrd + mld) / np.max(l_edge - r_edge))


# --------------------------------------------------------------------------- rendering
@lru_cache(maxsize=8)
def _grid(R: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates in [-1,1], float32 [R,R] each (cached, read-only)."""
    c = ((np.arange(R, dtype=np.float32) + 0.5) * (2.0 / R) - 1.0).astype(np.float32)
    x, y = np.meshgrid(c, c)
    x.flags.writeable = y.flags.writeable = False
    return x, y


def _tube(c: np.ndarray) -> np.ndarray:
    """Projected thickness across a hollow bone at normalised offset c in [-1, 1] (callers
    clamp; |c| = 1 is outside): brighter cortical margins, as ribs and clavicles show."""
    c2 = c * c  # <= 1, so 1 - c2 needs no clamping at 0
    return np.sqrt(1.0 - c2) - 0.5 * np.sqrt(np.maximum(1.0 - 1.8 * c2, 0.0))


def _bump(r2: np.ndarray) -> np.ndarray:
    """Smooth compact bump (1 - r^2)^2 for r < 1: a cheap stand-in for a Gaussian."""
    b = np.maximum(1.0 - r2, 0.0)
    return b * b


def _window(s: Subject, R: int, xr: tuple[float, float],
            yr: tuple[float, float]) -> tuple[slice, slice]:
    """Image rows/columns covering the anatomical box xr x yr (+2 px): local structures are
    evaluated there only, which is most of what keeps a render at a few milliseconds."""
    c, n = math.cos(s.rotation) * s.scale, math.sin(s.rotation) * s.scale
    xs = [c * X - n * Y + s.shift_x for X in xr for Y in yr]
    ys = [n * X + c * Y + s.shift_y for X in xr for Y in yr]
    k = R / 2

    def span(v: list[float]) -> slice:
        lo, hi = int((min(v) + 1) * k) - 2, int((max(v) + 1) * k) + 3
        return slice(min(max(lo, 0), R), max(min(hi, R), 0))

    return span(ys), span(xs)


def _splat(s: Subject, pts: np.ndarray, w: np.ndarray, R: int) -> np.ndarray:
    """Bilinear splat of anatomical points into an [R,R] density map (per unit area)."""
    x, y = _to_image(s, pts[:, 0], pts[:, 1])
    px = _clip((x + 1) * (R / 2) - 0.5, 0, R - 1.001)  # points off the film pile up on the
    py = _clip((y + 1) * (R / 2) - 0.5, 0, R - 1.001)  # border; none are that far out
    i0, j0 = px.astype(np.int64), py.astype(np.int64)
    fx, fy = px - i0, py - j0
    k = j0 * R + i0
    idx = np.concatenate([k, k + 1, k + R, k + R + 1])
    ww = np.concatenate([(1 - fx) * (1 - fy), fx * (1 - fy), (1 - fx) * fy, fx * fy])
    corners = ww.reshape(4, -1)  # a view: broadcasting beats np.tile of a strided column
    corners *= w
    out = np.bincount(idx, ww, minlength=R * R).reshape(R, R)
    return (out * (R / 2 * s.scale) ** 2).astype(np.float32)


def _blur(a: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur (edges replicated, kernel cut at 3 sigma) of an [R,R] map.

    Shifted-slice sums: several times faster than scipy's correlate1d on 128 px maps. Both
    passes run on flat, contiguous slices (ufuncs on strided 2-D views are ~2x slower); the
    column pass computes a few outputs that straddle two padded rows and drops them.
    """
    r = int(3.0 * sigma + 0.5)
    if r < 1:
        return a
    k = np.exp(-0.5 * (np.arange(-r, r + 1) / sigma) ** 2)
    k = (k / k.sum()).astype(np.float32)
    R0, R1 = a.shape
    p = np.empty((R0 + 2 * r, R1), a.dtype)  # rows padded by replication
    p[:r], p[r:r + R0], p[r + R0:] = a[:1], a, a[-1:]
    a = _taps(p.ravel(), k, R1, R0 * R1).reshape(R0, R1)
    L = R1 + 2 * r
    p = np.empty((R0, L), a.dtype)  # columns padded by replication
    p[:, :r], p[:, r:r + R1], p[:, r + R1:] = a[:, :1], a, a[:, -1:]
    out = np.empty(R0 * L, a.dtype)
    out[:(R0 - 1) * L + R1] = _taps(p.ravel(), k, 1, (R0 - 1) * L + R1)
    return np.ascontiguousarray(out.reshape(R0, L)[:, :R1])


def _taps(p: np.ndarray, k: np.ndarray, step: int, n: int) -> np.ndarray:
    """out[m] = sum_i k[i] p[m + i step], m < n, for a symmetric kernel k of 2r + 1 taps."""
    r = len(k) // 2
    out = k[r] * p[r * step:r * step + n]
    for i in range(r):  # pair the symmetric taps
        t = p[i * step:i * step + n] + p[(2 * r - i) * step:(2 * r - i) * step + n]
        t *= k[i]
        out += t
    return out


def _spine(s: Subject, X: np.ndarray, Y: np.ndarray) -> np.ndarray:
    """A column of vertebral bodies (darker disc spaces) with bright pedicle rings."""
    hw = s.spine_hw * (0.95 + 0.1 * Y)
    c = X / hw
    col = np.sqrt(np.maximum(1.0 - c * c, 0.0))
    ph = (Y - s.vert_phase) * (1.0 / s.vert_period)
    ph -= np.floor(ph)  # 0..1 along one vertebra, disc space at 0.5
    body = 1.0 - 0.45 * _clip((np.abs(ph - 0.5) - 0.38) * 8.0, 0.0, 1.0)
    pu, pv = (np.abs(X) - 0.62 * hw) / (0.17 * hw), (ph - 0.35) * 6.0
    ring = np.sqrt(pu * pu + pv * pv) - 0.75
    return 0.75 * col * body + 0.2 * _bump(ring * ring * 6.0)


def _ribs(s: Subject, Y: np.ndarray, ax: np.ndarray) -> np.ndarray:
    """Posterior ribs (curved bands down and outward) and fainter anterior ribs (down and in).

    Z = Y - f(d) straightens every posterior rib; a slightly warped index q = n u (1.15-0.15u)
    then counts ribs, so all of them are one periodic band (one evaluation, not a loop).
    """
    W, x0, n = s.thorax_hw, 0.7 * s.spine_hw, s.ribs_above_dome
    z0 = s.apex_y - 0.03

    def drop(d: np.ndarray | float, Yv: np.ndarray | float) -> np.ndarray | float:
        alpha = s.rib_alpha * (1.0 + 0.5 * _clip(Yv - s.apex_y, 0.0, 1.2))
        return (alpha * d * (1.0 + d) - 0.10) * d  # level near the spine, steep laterally

    dp = 0.4 * W - x0  # rib n meets the right dome peak at 40% of W
    inv = 1.0 / (s.dome_r - float(drop(dp, s.dome_r)) - z0)

    def index(Z: np.ndarray) -> np.ndarray:
        u = np.maximum(Z - z0, 0.0) * inv
        return n * u * (1.15 - 0.15 * u)  # spacing grows downwards

    d = np.maximum(ax - x0, 0.0)
    q = index(Y - drop(d, Y))
    fq = (q - np.floor(q)) * (2.0 / s.rib_width) - 1.0
    fade = _clip((_wall(s, Y) + 0.035 - ax) * 33.0, 0.0, 1.0) * _clip(
        (ax - x0) * 33.0 + 0.5, 0.0, 1.0)
    fade *= 1.0 - 0.4 * np.minimum(d * (1.0 / W), 1.0)  # lateral parts fainter (oblique)
    # (fq, fa >= -1. Casting the cut-off masks first: float * bool arrays is slow in numpy.)
    A = s.rib_mu * _tube(np.minimum(fq, 1.0)) * fade * (q < n + 1.0).astype(np.float32)
    # Anterior ribs start where posterior rib k meets the lateral wall (same index there).
    qa = index(Y - 0.45 * np.maximum(W - ax, 0.0) - float(drop(W - x0, 1.0)))
    fa = (qa - np.floor(qa)) * (2.0 / 0.55) - 1.0
    span = _clip((ax - 0.35 * W) * 12.0, 0.0, 1.0) * _clip((W + 0.02 - ax) * 33.0, 0.0, 1.0)
    return A + 0.45 * s.rib_mu * _tube(np.minimum(fa, 1.0)) * span * (qa < 6.5).astype(
        np.float32)


def _girdle(s: Subject, Y: np.ndarray, ax: np.ndarray) -> np.ndarray:
    """Clavicles (near horizontal, gently S-shaped) and humeral heads."""
    W = s.thorax_hw
    t = (ax - 0.06) * (1.0 / (0.72 * W))
    tt = _clip(t, 0.0, 1.0)
    yc = s.clav_y - s.clav_rise * tt + 0.1 * tt * (1.0 - tt) * (0.5 - tt)
    ends = _clip(t * 20.0, 0.0, 1.0) * _clip((1.0 - t) * 12.0, 0.0, 1.0)
    A = 0.9 * _tube(_clip((Y - yc) / (0.034 + 0.01 * tt), -1.0, 1.0)) * ends
    hx, hy = (ax - W - 0.23) * (1 / 0.13), (Y - s.clav_y - 0.02) * (1 / 0.13)
    return A + 0.6 * np.sqrt(np.maximum(1.0 - hx * hx - hy * hy, 0.0))


def _ellipsoid(X: np.ndarray, Y: np.ndarray, cx: float, cy: float, a: float,
               b: float) -> np.ndarray:
    """Projected thickness of an ellipsoid, normalised to 1 at the centre."""
    u, v = (X - cx) * (1.0 / a), (Y - cy) * (1.0 / b)
    return np.sqrt(np.maximum(1.0 - u * u - v * v, 0.0))


def render(subject: Subject, heart_scale: float | None = None, resolution: int = 128,
           noise: bool = True) -> PhantomImage:
    """Render a subject with a given heart size (deterministic).

    Args:
        subject: from `sample_subject` / `sample_case`.
        heart_scale: transverse heart size relative to the subject's nominal heart (1.0 if
            None). Changing it changes the image only inside the heart (+ ~1-3 px of blur).
        resolution: output side R (>= 16).
        noise: add detector noise; it is drawn from the subject seed, so it is identical
            between renders of the same subject at the same resolution.

    Returns:
        `PhantomImage` with image float32 [R,R] in [0,1] and masks bool [3,R,R].
    """
    s, R = subject, int(resolution)
    h = 1.0 if heart_scale is None else float(heart_scale)
    if R < 16:
        raise ValueError(f"resolution must be >= 16, got {resolution}")
    if not 0.2 < h < 3.0:
        raise ValueError(f"heart_scale must be in (0.2, 3), got {h}")
    X, Y = _to_anatomy(s, *_grid(R))
    ax = np.abs(X)
    px = 2.0 / (R * s.scale)  # one pixel in anatomical units
    W = s.thorax_hw

    # Soft tissue: elliptical cross-section; narrow neck above the shoulders.
    shoulder = _clip((Y - s.apex_y + 0.2) * 5.0, 0.0, 1.0)
    shoulder = shoulder * shoulder * (3.0 - 2.0 * shoulder)  # smoothstep: rounded shoulders
    yb = (Y - s.clav_y) * (1 / 0.3)
    r = ax / (0.3 + (W + s.body_margin - 0.3) * shoulder + 0.35 * _bump(yb * yb))
    body = s.body_depth * np.sqrt(np.maximum(1.0 - r * r, 0.0))
    A = body.copy()

    # Lungs replace part of the depth with air; darker in the middle, thinner at the apex.
    w = _window(s, R, (-W - 0.03, W + 0.03),
                (s.apex_y - 0.03, s.dome_l + 0.36 * s.dome_c2 + 0.13 * s.dome_c4 + 0.03))
    axw, Yw = _crop(w, ax, Y)
    d = np.full((R, R), -1.0, np.float32)
    d[w] = dw = _lung_dist(s, axw, Yw, (X[w] > 0).astype(np.float32))
    lw = _clip(dw * (1 / px) + 0.5, 0.0, 1.0) * (0.4 + 0.6 * _clip(dw * 10.0, 0.0, 1.0))
    lw *= s.lung_air * (0.7 + 0.3 * _clip((Yw - s.apex_y) * 2.5, 0.0, 1.0))
    lung = np.zeros((R, R), np.float32)
    lung[w] = lw
    A[w] -= body[w] * lw

    # Heart: an ellipsoid-like mass; it displaces lung only inside its own outline, which is
    # what confines a heart-size change to the heart region (the counterfactual guarantee).
    w = _heart_box(s, R, h)
    Xw, Yw = _crop(w, X, Y)
    r2 = _heart_radius2(s, Xw, Yw, h)
    below = _diaphragm(s, Xw) - Yw
    hp = np.sqrt(np.maximum(1.0 - r2, 0.0)) * _clip(below * (1 / px) + 0.5, 0.0, 1.0)
    A[w] += body[w] * lung[w] * np.minimum(2.0 * hp, 0.85) + (s.heart_density * s.body_depth) * hp
    heart = np.zeros((R, R), bool)
    heart[w] = (r2 < 1) & (below > 0)

    # Air in the trachea (over the upper spine, pushed right by the knob) and under the left
    # dome; hila (pulmonary arteries, the left one higher); breast shadows with a sharp
    # inferior margin over the lower lung fields.
    w = _window(s, R, (-0.06, 0.06), (-1.5, s.carina_y + 0.03))
    yk = (Y[w] - s.knob[1]) * 5.0
    tx = (X[w] + 0.012 * _bump(yk * yk)) * (1 / 0.045)
    A[w] -= 0.3 * body[w] * np.sqrt(np.maximum(1.0 - tx * tx, 0.0)) * _clip(
        (s.carina_y - Y[w]) * 25.0, 0.0, 1.0)
    if s.bubble > 0:
        w = _window(s, R, (0.45 * W - 0.1, 0.45 * W + 0.1), (s.dome_l + 0.06, s.dome_l + 0.18))
        A[w] -= 0.25 * s.bubble * body[w] * _ellipsoid(X[w], Y[w], 0.45 * W, s.dome_l + 0.12,
                                                       0.1, 0.06)
    for side in (-1.0, 1.0):
        cx, cy = side * (s.med_lo + 0.05), s.dome_r - 0.40 - 0.03 * (side > 0)
        w = _window(s, R, (cx - 0.11, cx + 0.11), (cy - 0.18, cy + 0.18))
        e = _ellipsoid(X[w], Y[w], cx, cy, 0.11, 0.18)
        A[w] += 0.45 * (e * e) * (e * e)
        if s.breast > 0:
            cx, cy = side * 0.55 * W, s.dome_r - 0.02
            w = _window(s, R, (cx - 0.34, cx + 0.34), (cy - 0.24, cy + 0.24))
            A[w] += s.breast * _ellipsoid(X[w], Y[w], cx, cy, 0.34, 0.24) * _clip(
                0.5 + (Y[w] - cy) * (1 / 0.24), 0.0, 1.0)
        if s.scapula > 0:  # a plate over the lateral upper lung
            cx, cy = side * (W + 0.02), s.clav_y + 0.30
            w = _window(s, R, (cx - 0.17, cx + 0.17), (cy - 0.3, cy + 0.3))
            e = _ellipsoid(X[w], Y[w], cx, cy, 0.17, 0.3)
            A[w] += 0.18 * s.scapula * np.sqrt(e * (2.0 - e))

    # Bones.
    w = _window(s, R, (-0.12, 0.12), (-1.5, 1.5))
    A[w] += _spine(s, *_crop(w, X, Y))
    w = _window(s, R, (-W - 0.06, W + 0.06), (s.apex_y - 0.1, s.dome_l + 0.5))
    A[w] += _ribs(s, *_crop(w, Y, ax))
    w = _window(s, R, (-1.5, 1.5), (s.clav_y - s.clav_rise - 0.2, s.clav_y + 0.16))
    A[w] += _girdle(s, *_crop(w, Y, ax))

    # Vessels and the pacemaker lead: points splatted, then blurred into lines.
    dens = _splat(s, s.vessels[:, :2], s.vessels[:, 2], R)
    if s.device:
        dens += _splat(s, s.wire, np.full(len(s.wire), 0.0035, np.float32), R)
        cx, cy = 0.62 * W, s.clav_y + 0.16
        w = _window(s, R, (cx - 0.08, cx + 0.08), (cy - 0.06, cy + 0.06))
        gx, gy = (X[w] - cx) * (1 / 0.075), (Y[w] - cy) * 20.0
        gx, gy = gx * gx, gy * gy
        A[w] += 2.0 * _clip((1.0 - gx * gx - gy * gy) * 8.0, 0.0, 1.0)
    A += 0.03 * _blur(dens, 0.014 / px)

    # Film: beam quality, PSF, Poisson-like quantum noise (Gaussian with variance ~ T, from
    # a fixed normal field so that counterfactual renders share it), window and gamma.
    T = _blur(np.exp(-s.mu_scale * A), s.blur * R / 128)
    if noise:
        z = np.random.default_rng([s.seed, _NOISE]).standard_normal((R, R), np.float32)
        T += np.sqrt(np.maximum(T, 1e-4) * (1.0 / s.photons * (R / 128) ** 2)) * z
    img = np.exp(np.log(_clip(1.0 - T, 1e-6, 1.0)) * s.gamma) * (s.hi - s.lo) + s.lo
    cl, cr, ct, cb = (int(round(c * R)) for c in s.collimation)
    for sl in (np.s_[:, :cl], np.s_[:, R - cr:], np.s_[:ct, :], np.s_[R - cb:, :]):
        img[sl] = s.coll_value  # (a zero width gives an empty slice)
    img = _clip(img, 0.0, 1.0)

    lungs, left = d > 0, X > 0
    masks = np.stack([heart, lungs & ~left & ~heart, lungs & left & ~heart])
    mid = (_midline(s) + 1) * R / 2
    return PhantomImage(img, masks, mid, h, subject_ctr(s, h), s)


def _crop(w: tuple[slice, slice], *maps: np.ndarray) -> list[np.ndarray]:
    """Contiguous copies of a window of full maps, for windows used by many operations:
    numpy ufuncs run ~2x slower on the strided views that plain slicing gives."""
    return [np.ascontiguousarray(m[w]) for m in maps]


def _heart_box(s: Subject, R: int, h: float) -> tuple[slice, slice]:
    """Window holding the heart at scale h (bounding box of its two scaled ellipses)."""
    cx, cy, a, b, t = s.lv
    rx, ry, ra, rb = s.ra
    hx = math.hypot(a * math.cos(t), b * math.sin(t))
    hy = math.hypot(a * math.sin(t), b * math.cos(t))
    ya, sv = s.heart_anchor_y, 1.0 + 0.4 * (h - 1.0)
    x0, x1 = min(cx - hx, rx - ra) * h, max(cx + hx, rx + ra) * h
    y0, y1 = min(cy - hy, ry - rb), max(cy + hy, ry + rb)
    return _window(s, R, (x0, x1), (ya + (y0 - ya) * sv, ya + (y1 - ya) * sv))


def render_batch(seeds: Sequence[int], cardiomegaly_flags: Sequence[bool], resolution: int = 128,
                 device_probs: tuple[float, float] = DEVICE_PROBS,
                 ) -> tuple[np.ndarray, np.ndarray, list[dict]]:
    """Render one `sample_case` per seed, ready for an image store.

    Args:
        seeds: subject seeds.
        cardiomegaly_flags: one label per seed.
        resolution: side R.
        device_probs: pacemaker probability for (healthy, cardiomegaly) cases.

    Returns:
        images uint8 [N,R,R], masks uint8 [N,3,R,R] (`MASK_NAMES` order) and one metadata
        dict per image (JSON-serialisable; CheXpert-style label columns).
    """
    if len(seeds) != len(cardiomegaly_flags):
        raise ValueError(f"{len(seeds)} seeds but {len(cardiomegaly_flags)} flags")
    R, n = int(resolution), len(seeds)
    images = np.empty((n, R, R), np.uint8)
    masks = np.empty((n, 3, R, R), np.uint8)
    meta = []
    for i, (seed, flag) in enumerate(zip(seeds, cardiomegaly_flags)):
        subject, h = sample_case(int(seed), bool(flag), *device_probs)
        p = render(subject, h, R)
        images[i] = np.round(p.image * 255)
        masks[i] = p.masks
        dev = float(subject.device)
        meta.append({
            "patient_id": f"phantom{int(seed):07d}", "view": "PA", "subject_seed": int(seed),
            "heart_scale": h, "ctr": p.ctr, "ctr_masks": p.mask_ctr, "sex": subject.sex,
            "device": int(subject.device), "Cardiomegaly": float(bool(flag)),
            "No Finding": float(not flag and not subject.device), "Support Devices": dev,
        })
    return images, masks, meta
