//! Helpers shared by the crash-test child (`walden wal-child`), the simulated
//! disk and the tests: deterministic payloads that a checker can rebuild
//! byte for byte, and a small seedable generator.

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

/// splitmix64: small and seedable; good enough to choose workloads and faults.
#[derive(Clone, Debug)]
pub struct Rng(pub u64);

impl Rng {
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// A number in `0..n` (0 when `n` is 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }

    /// A number in `lo..=hi`.
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.below(hi - lo + 1)
    }
}
