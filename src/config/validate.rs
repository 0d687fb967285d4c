//! Range checks. Each failure names the field, the value and what is allowed.

use super::{Auto, Config, ConfigError, TrainConfig};
use crate::device::DeviceChoice;

fn invalid(field: &'static str, value: impl ToString, allowed: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        field,
        value: value.to_string(),
        allowed: allowed.into(),
    }
}

fn int_range(field: &'static str, v: usize, lo: usize, hi: usize) -> Result<(), ConfigError> {
    if v < lo || v > hi {
        return Err(invalid(
            field,
            v,
            format!("must be an integer in {lo}..={hi}"),
        ));
    }
    Ok(())
}

/// `lo < v <= hi` (open below) or `lo <= v <= hi`.
fn real_range(
    field: &'static str,
    v: f64,
    lo: f64,
    hi: f64,
    open_below: bool,
) -> Result<(), ConfigError> {
    let ok = v.is_finite() && if open_below { v > lo } else { v >= lo } && v <= hi;
    if !ok {
        let bracket = if open_below { "(" } else { "[" };
        return Err(invalid(
            field,
            v,
            format!("must be a number in {bracket}{lo}, {hi}]"),
        ));
    }
    Ok(())
}

fn class_id(field: &'static str, v: &Auto<i64>) -> Result<(), ConfigError> {
    if let Auto::Value(c) = v {
        if !(0..1000).contains(c) {
            return Err(invalid(
                field,
                c,
                "must be \"auto\" or a class index in 0..=999",
            ));
        }
    }
    Ok(())
}

fn increasing(field: &'static str, v: &[usize]) -> Result<(), ConfigError> {
    if v.windows(2).any(|w| w[0] >= w[1]) {
        return Err(invalid(
            field,
            format!("{v:?}"),
            "must be strictly increasing",
        ));
    }
    Ok(())
}

fn train(prefix: &'static [&'static str; 6], t: &TrainConfig) -> Result<(), ConfigError> {
    real_range(prefix[0], t.lr, 0.0, 10.0, true)?;
    int_range(prefix[1], t.batch_size, 2, 8192)?;
    real_range(prefix[2], t.weight_decay, 0.0, 0.1, false)?;
    increasing(prefix[3], &t.lr_drops)?;
    int_range(prefix[4], t.width, 1, 16)?;
    momentum(prefix[5], t.momentum)?;
    nesterov(prefix[5], t.nesterov, t.momentum)?;
    Ok(())
}

/// Nesterov's momentum needs a momentum to act on (PyTorch refuses it too).
fn nesterov(
    momentum_field: &'static str,
    nesterov: bool,
    momentum: f64,
) -> Result<(), ConfigError> {
    if nesterov && momentum == 0.0 {
        return Err(invalid(
            momentum_field,
            momentum,
            "must be above 0 when nesterov = true (or set nesterov = false)",
        ));
    }
    Ok(())
}

/// SGD momentum: [0, 1).
fn momentum(field: &'static str, v: f64) -> Result<(), ConfigError> {
    if !(v.is_finite() && (0.0..1.0).contains(&v)) {
        return Err(invalid(field, v, "must be a number in [0, 1)"));
    }
    Ok(())
}

impl Config {
    pub fn validate(&self) -> Result<(), ConfigError> {
        let mut seen: Vec<(char, &'static str)> = Vec::new();
        for (field, binding) in self.keys.bindings() {
            let Some(c) = crate::config::KeysConfig::key_char(binding) else {
                return Err(invalid(
                    field,
                    format!("{binding:?}"),
                    "must be one printable character or \"space\"",
                ));
            };
            if let Some((_, other)) = seen.iter().find(|(k, _)| *k == c) {
                return Err(invalid(
                    field,
                    format!("{binding:?}"),
                    format!("is already bound to {other}; choose another key"),
                ));
            }
            seen.push((c, field));
        }
        let th = &self.threat;
        class_id("threat.target_class", &th.target_class)?;
        class_id("threat.poison_class", &th.poison_class)?;
        class_id("threat.adv_class", &th.adv_class)?;
        if let Auto::Value(ids) = &th.target_ids {
            if ids.is_empty() || ids.len() > 256 {
                return Err(invalid(
                    "threat.target_ids",
                    format!("{ids:?}"),
                    "must be \"auto\" or a list of 1 to 256 indices",
                ));
            }
        }
        if let Auto::Value(n) = th.npoison {
            int_range("threat.npoison", n, 1, 50_000)?;
        }
        real_range("threat.eps", th.eps, 0.0, 255.0, false)?;
        real_range("threat.color_eps", th.color_eps, 0.0, 0.5, false)?;
        int_range("threat.color_grid", th.color_grid, 2, 64)?;
        real_range("threat.smooth_coef", th.smooth_coef, 0.0, 1e6, false)?;

        let c = &self.craft;
        if let Auto::Value(s) = c.steps {
            int_range("craft.steps", s, 1, 1_000_000)?;
        }
        int_range("craft.unroll_steps", c.unroll_steps, 1, 16)?;
        if let Auto::Value(m) = c.ensemble_size {
            int_range("craft.ensemble_size", m, 1, 1024)?;
        }
        if let Auto::Value(s) = c.stagger {
            int_range("craft.stagger", s, 1, 1000)?;
        }
        if let Auto::Value(f) = c.meta_batch_fraction {
            real_range("craft.meta_batch_fraction", f, 0.0, 1.0, true)?;
        }
        if let Auto::Value(p) = c.parallel_surrogates {
            int_range("craft.parallel_surrogates", p, 1, 1024)?;
        }
        real_range("craft.outer_lr", c.outer_lr, 0.0, 1e6, true)?;
        int_range("craft.warmup_steps", c.warmup_steps, 0, 1_000_000)?;
        if let Auto::Value(d) = &c.lr_drops {
            increasing("craft.lr_drops", d)?;
        }
        real_range("craft.lr_drop_factor", c.lr_drop_factor, 0.0, 1.0, true)?;

        train(
            &[
                "surrogate.lr",
                "surrogate.batch_size",
                "surrogate.weight_decay",
                "surrogate.lr_drops",
                "surrogate.width",
                "surrogate.momentum",
            ],
            &self.surrogate,
        )?;
        int_range(
            "surrogate.warmup_epochs",
            self.surrogate.warmup_epochs,
            0,
            10_000,
        )?;

        let v = &self.victim;
        if let Auto::Value(e) = v.epochs {
            int_range("victim.epochs", e, 1, 100_000)?;
        }
        int_range("victim.warmup_epochs", v.warmup_epochs, 0, 10_000)?;
        real_range("victim.lr", v.lr, 0.0, 10.0, true)?;
        increasing("victim.lr_drops", &v.lr_drops)?;
        int_range("victim.batch_size", v.batch_size, 2, 8192)?;
        real_range("victim.weight_decay", v.weight_decay, 0.0, 0.1, false)?;
        momentum("victim.momentum", v.momentum)?;
        nesterov("victim.momentum", v.nesterov, v.momentum)?;
        int_range("victim.trials", v.trials, 1, 10_000)?;

        let m = &self.matching;
        int_range("matching.restarts", m.restarts, 1, 1000)?;
        int_range("matching.surrogates", m.surrogates, 1, 1024)?;
        real_range("matching.step_size", m.step_size, 0.0, 10.0, true)?;
        if let Auto::Value(e) = m.surrogate_epochs {
            int_range("matching.surrogate_epochs", e, 1, 100_000)?;
        }
        if self.craft.recipe == super::CraftRecipe::GradientMatching {
            if let Auto::Value(steps) = self.craft.steps {
                if steps % m.restarts != 0 || steps / m.restarts < 8 {
                    return Err(invalid(
                        "craft.steps",
                        steps,
                        format!(
                            "must share evenly among matching.restarts = {} with at least 8 steps each (or \"auto\": {} each)",
                            m.restarts,
                            super::MATCHING_STEPS_PER_RESTART
                        ),
                    ));
                }
            }
            if !self.run.surrogate_devices.is_empty() {
                return Err(invalid(
                    "run.surrogate_devices",
                    format!("{:?}", self.run.surrogate_devices),
                    "spreads MetaPoison's ensemble; gradient matching runs on run.device: remove it",
                ));
            }
        }

        let r = &self.run;
        if let Err(e) = r.device.parse::<DeviceChoice>() {
            return Err(invalid(
                "run.device",
                format!("\"{}\"", r.device),
                e.to_string(),
            ));
        }
        for d in &r.surrogate_devices {
            match d.parse::<DeviceChoice>() {
                Ok(DeviceChoice::Auto) => {
                    return Err(invalid(
                        "run.surrogate_devices",
                        format!("\"{d}\""),
                        "must name a device: \"cpu\", \"cuda\" or \"cuda:N\"",
                    ))
                }
                Ok(_) => {}
                Err(e) => {
                    return Err(invalid(
                        "run.surrogate_devices",
                        format!("\"{d}\""),
                        e.to_string(),
                    ))
                }
            }
        }
        int_range("run.threads", r.threads, 0, 1024)?;
        int_range("run.max_nonfinite_steps", r.max_nonfinite_steps, 1, 1000)?;
        if self.data.dataset != super::DatasetKind::Embedded && self.data.path.is_none() {
            return Err(invalid(
                "data.path",
                "(absent)",
                "must name the folder holding the data set's files for this dataset",
            ));
        }
        Ok(())
    }
}
