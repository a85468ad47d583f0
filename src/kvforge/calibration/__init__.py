"""Per-model calibration: what some policies need to know about a model, measured once
(`measure.py`, `kvforge calibrate`) and kept on disk (`store.py`). The measuring is imported only
where it runs (it needs the policies, which need the stored calibration)."""

from kvforge.calibration.store import (
    _KNOWN,
    Calibration,
    calibration_path,
    find_calibration,
    fingerprint,
    remember,
    require_calibration,
)

__all__ = ["_KNOWN", "Calibration", "calibration_path", "find_calibration", "fingerprint", "remember", "require_calibration"]
