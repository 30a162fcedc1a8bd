//! Runtime CPU-feature dispatch: the same kernel source compiled three times (AVX-512,
//! AVX2+FMA, and the portable baseline), chosen once per process.
//!
//! `TRITON_AL_SIMD=avx512|avx2|portable` forces a level (never above what the CPU has):
//! the tests use it to check that every variant computes the same scores.

use std::sync::atomic::{AtomicU8, Ordering};

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Level {
    Portable = 1,
    Avx2 = 2,
    Avx512 = 3,
}

impl Level {
    pub fn name(self) -> &'static str {
        match self {
            Level::Portable => "portable",
            Level::Avx2 => "avx2",
            Level::Avx512 => "avx512",
        }
    }
}

static LEVEL: AtomicU8 = AtomicU8::new(0);

fn detect() -> Level {
    #[cfg(target_arch = "x86_64")]
    {
        if is_x86_feature_detected!("avx512f")
            && is_x86_feature_detected!("avx512bw")
            && is_x86_feature_detected!("avx512dq")
            && is_x86_feature_detected!("avx512vl")
            && is_x86_feature_detected!("fma")
        {
            return Level::Avx512;
        }
        if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
            return Level::Avx2;
        }
    }
    Level::Portable
}

/// The level in use: the best the CPU has, lowered by `TRITON_AL_SIMD` if set.
pub fn level() -> Level {
    match LEVEL.load(Ordering::Relaxed) {
        3 => Level::Avx512,
        2 => Level::Avx2,
        1 => Level::Portable,
        _ => {
            let best = detect();
            let chosen = match std::env::var("TRITON_AL_SIMD").ok().as_deref() {
                Some("portable") => Level::Portable,
                Some("avx2") => best.min(Level::Avx2),
                _ => best,
            };
            LEVEL.store(chosen as u8, Ordering::Relaxed);
            chosen
        }
    }
}

/// Define `pub fn $name(args) -> ret` that runs `$body_fn(args)` compiled for the best level.
/// `$body_fn::<M: MulAdd>` must be `#[inline(always)]` so that it is compiled inside each
/// variant; it gets fused multiply-add in the AVX variants and separate mul/add in the other.
macro_rules! multiversion {
    ($(#[$meta:meta])* $vis:vis fn $name:ident($($arg:ident : $ty:ty),* $(,)?) $(-> $ret:ty)? => $body_fn:ident) => {
        $(#[$meta])*
        $vis fn $name($($arg: $ty),*) $(-> $ret)? {
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx2,fma,bmi1,bmi2")]
                unsafe fn avx512($($arg: $ty),*) $(-> $ret)? { $body_fn::<$crate::vmath::Fused>($($arg),*) }
                #[target_feature(enable = "avx2,fma,bmi1,bmi2")]
                unsafe fn avx2($($arg: $ty),*) $(-> $ret)? { $body_fn::<$crate::vmath::Fused>($($arg),*) }
                match $crate::dispatch::level() {
                    // SAFETY: level() only reports features the CPU was checked to have.
                    $crate::dispatch::Level::Avx512 => return unsafe { avx512($($arg),*) },
                    $crate::dispatch::Level::Avx2 => return unsafe { avx2($($arg),*) },
                    $crate::dispatch::Level::Portable => {}
                }
            }
            $body_fn::<$crate::vmath::Separate>($($arg),*)
        }
    };
}
pub(crate) use multiversion;
