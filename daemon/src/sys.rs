//! Facts about this process from the operating system, for status reports and logs. A leaf:
//! it imports nothing from the crate, so any module may ask it.

/// Resident memory of this process, from `/proc/self/statm` (0 where unavailable).
pub fn resident_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| s.split_whitespace().nth(1).and_then(|p| p.parse::<u64>().ok()))
        .map_or(0, |pages| pages * 4096)
}
