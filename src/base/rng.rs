//! Deterministic randomness. Every random draw of a run is a pure function of the seed and of
//! *where* it happens (which surrogate, which craft step, what for), so a resumed run repeats
//! the draws of an uninterrupted one without saving any generator state.

/// SplitMix64 (Steele, Lea, Flood 2014): small, fast, and good enough for shuffling.
#[derive(Debug, Clone)]
pub struct SplitMix64(u64);

impl SplitMix64 {
    pub fn new(seed: u64) -> Self {
        SplitMix64(seed)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in [0, 1).
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
    /// Uniform in 0..n.
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_f64() * n as f64) as usize % n.max(1)
    }
    /// Standard normal (Box-Muller).
    pub fn next_normal(&mut self) -> f64 {
        let u1 = 1.0 - self.next_f64(); // in (0, 1]
        let u2 = self.next_f64();
        (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
    }
    /// A tensor of uniform draws in [lo, hi). Drawn here, not by libtorch's global generator,
    /// so that concurrent jobs in one process cannot disturb each other's draws.
    pub fn uniform_tensor(
        &mut self,
        shape: &[i64],
        lo: f64,
        hi: f64,
        opts: (tch::Kind, tch::Device),
    ) -> tch::Tensor {
        let n: i64 = shape.iter().product();
        let v: Vec<f64> = (0..n).map(|_| lo + (hi - lo) * self.next_f64()).collect();
        tch::Tensor::from_slice(&v)
            .view(shape)
            .to_kind(opts.0)
            .to_device(opts.1)
    }
    /// A tensor of normal draws with mean 0 and standard deviation `std`.
    pub fn normal_tensor(
        &mut self,
        shape: &[i64],
        std: f64,
        opts: (tch::Kind, tch::Device),
    ) -> tch::Tensor {
        let n: i64 = shape.iter().product();
        let v: Vec<f64> = (0..n).map(|_| std * self.next_normal()).collect();
        tch::Tensor::from_slice(&v)
            .view(shape)
            .to_kind(opts.0)
            .to_device(opts.1)
    }
    pub fn shuffle<T>(&mut self, v: &mut [T]) {
        for i in (1..v.len()).rev() {
            v.swap(i, self.below(i + 1));
        }
    }
}

/// What a stream of random numbers is for; part of its derived seed.
#[derive(Debug, Clone, Copy)]
#[repr(u64)]
pub enum Purpose {
    SurrogateInit = 1,
    Shuffle = 2,
    MetaBatchChoice = 3,
    PerturbationInit = 4,
    Pretrain = 5,
    /// Gradient matching's augmentation of the poisons, per step.
    Augment = 6,
}

/// A seed for one purpose at one place: mixes the run seed with the coordinates.
pub fn derive(seed: u64, purpose: Purpose, a: u64, b: u64) -> u64 {
    let mut r = SplitMix64::new(seed ^ (purpose as u64).wrapping_mul(0xD6E8_FEB8_6659_FD93));
    let x = r.next_u64() ^ a.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    let mut r = SplitMix64::new(x);
    let y = r.next_u64() ^ b.wrapping_mul(0xC2B2_AE3D_27D4_EB4F);
    SplitMix64::new(y).next_u64() >> 1 // libtorch seeds are taken as i64 too
}
