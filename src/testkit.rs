//! Helpers shared by the crash-test child (`walden wal-child`) and the tests:
//! deterministic payloads that a checker can rebuild byte for byte.

/// `len` pseudo-random bytes determined by `seed` (xorshift64).
pub fn payload(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// A length in `0..=max` determined by `seed`.
pub fn payload_len(seed: u64, max: usize) -> usize {
    (seed.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 40) as usize % (max + 1)
}
