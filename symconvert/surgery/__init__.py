"""Surgery: which layers, the plan, convert/fold, calibration."""
