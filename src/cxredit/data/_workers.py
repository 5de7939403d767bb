"""Worker-process entry points of `cxredit.data.prepare`.

Kept in a module that imports neither torch nor pandas: worker processes are spawned, and
each re-imports the module its function lives in, so a light module starts in a fraction of
a second instead of paying for torch in every worker.
"""

from __future__ import annotations


def convert_chunk(rows: list[int], paths: list[str], resolution: int) -> list[tuple]:
    """Read + resize a chunk of files. Returns (row, uint8 [R,R] | None, error reason)."""
    from cxredit.data.io import XrayReadError, read_xray_resized

    out = []
    for row, path in zip(rows, paths):
        try:
            out.append((row, read_xray_resized(path, resolution), ""))
        except XrayReadError as e:
            out.append((row, None, e.reason))
        except Exception as e:  # noqa: BLE001 - one bad file must never stop the job
            out.append((row, None, f"{type(e).__name__}: {e}".splitlines()[0]))
    return out


def render_chunk(rows: list[int], seeds: list[int], flags: list[bool], resolution: int,
                 device_probs: tuple[float, float]) -> tuple:
    """Render a chunk of phantom cases (see `cxredit.data.phantom.render_batch`)."""
    from cxredit.data.phantom import render_batch

    images, masks, metas = render_batch(seeds, flags, resolution, device_probs=device_probs)
    for m in metas:
        m.setdefault("source", "phantom")
        m.setdefault("study_id", m.get("patient_id", ""))
    return rows, images, masks, metas
