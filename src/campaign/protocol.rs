//! Efficacy protocols: a fixed way of judging a crafting setting (its targets, the victims
//! that judge it and how many of each), so that settings are compared on the same targets by
//! the same victims. `campaign --protocol NAME` takes a built-in one (benches/efficacy/NAME.toml,
//! compiled in) or a file of the same form.

use crate::config::{Auto, Config, DatasetKind, NetKind, Recipe, Subset};
use serde::{Deserialize, Serialize};
use std::path::PathBuf;

/// One kind of victim: an architecture trained with a recipe.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VictimKind {
    pub net: NetKind,
    pub recipe: Recipe,
}

impl VictimKind {
    /// As tables show it, e.g. "convnet-bn, standard recipe".
    pub fn label(&self) -> String {
        format!("{}, {} recipe", self.net.name(), self.recipe.name())
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Protocol {
    pub name: String,
    pub description: String,
    /// The data set its targets belong to, and the training images victims learn from: the
    /// targets were chosen by how clean victims of that data see them.
    pub dataset: DatasetKind,
    pub train_limit: usize,
    pub subset: Subset,
    /// Epochs every victim trains (whatever the machine's `auto`).
    pub victim_epochs: usize,
    pub target_class: i64,
    pub poison_class: i64,
    /// Target ids among the test images of the target class, one crafting run each.
    pub targets: Vec<usize>,
    /// Victims per arm and victim kind.
    pub trials: usize,
    /// Also the noise arm (the poisons' clean images moved by random +-eps noise).
    pub noise_control: bool,
    pub victims: Vec<VictimKind>,
}

/// The protocols compiled into the binary, by name.
const BUILT_IN: [(&str, &str); 2] = [
    (
        "standard",
        include_str!("../../benches/efficacy/standard.toml"),
    ),
    (
        "gray-box",
        include_str!("../../benches/efficacy/gray-box.toml"),
    ),
];

#[derive(Debug, thiserror::Error)]
pub enum ProtocolError {
    #[error("--protocol {given}: no built-in protocol of that name (standard, gray-box) and no such file")]
    Unknown { given: String },
    #[error("cannot read protocol file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("protocol {origin}: {message}")]
    Invalid { origin: String, message: String },
}

impl Protocol {
    /// A built-in protocol by name, or a protocol file.
    pub fn load(name_or_path: &str) -> Result<Protocol, ProtocolError> {
        if let Some((_, text)) = BUILT_IN.iter().find(|(n, _)| *n == name_or_path) {
            return Protocol::parse(text, name_or_path);
        }
        let path = PathBuf::from(name_or_path);
        if !path.exists() {
            return Err(ProtocolError::Unknown {
                given: name_or_path.into(),
            });
        }
        let text = std::fs::read_to_string(&path).map_err(|source| ProtocolError::Read {
            path: path.clone(),
            source,
        })?;
        Protocol::parse(&text, name_or_path)
    }

    pub fn parse(text: &str, origin: &str) -> Result<Protocol, ProtocolError> {
        let invalid = |message: String| ProtocolError::Invalid {
            origin: origin.into(),
            message,
        };
        let p: Protocol =
            toml::from_str(text).map_err(|e| invalid(e.message().trim().replace('\n', " ")))?;
        if p.targets.is_empty() || p.victims.is_empty() {
            return Err(invalid(
                "needs at least one target and one victim kind".into(),
            ));
        }
        if p.trials == 0 {
            return Err(invalid("trials must be at least 1".into()));
        }
        if let Some(v) = p
            .victims
            .iter()
            .enumerate()
            .find(|(i, v)| p.victims[..*i].contains(v))
        {
            return Err(invalid(format!(
                "victim kind {} is listed twice",
                v.1.label()
            )));
        }
        Ok(p)
    }

    /// Fits a campaign's config to the protocol: the data set must be the protocol's; the
    /// training images, the victims' epochs and the target and poison classes become its own.
    /// A config that gives other values for them is refused, since the protocol's targets
    /// would then be judged on other data or mean other images.
    pub fn fit(&self, config: &mut Config) -> Result<(), ProtocolError> {
        let invalid = |message: String| ProtocolError::Invalid {
            origin: self.name.clone(),
            message,
        };
        if config.data.dataset != self.dataset {
            return Err(invalid(format!(
                "is defined on the {:?} data set, the config's data.dataset is {:?}",
                self.dataset, config.data.dataset
            )));
        }
        /// A field the protocol pins that the config sets otherwise.
        #[derive(Debug, thiserror::Error)]
        #[error("uses {field} = {pinned} where the config has {configured}; remove {field} from the config")]
        struct PinConflict {
            field: String,
            pinned: String,
            configured: String,
        }
        fn pin<T: PartialEq + std::fmt::Debug + Clone>(
            field: &str,
            slot: &mut Auto<T>,
            value: T,
        ) -> Result<(), PinConflict> {
            match slot {
                Auto::Value(v) if *v != value => Err(PinConflict {
                    field: field.to_string(),
                    pinned: format!("{value:?}"),
                    configured: format!("{v:?}"),
                }),
                _ => {
                    *slot = Auto::Value(value);
                    Ok(())
                }
            }
        }
        let pinned = pin(
            "data.train_limit",
            &mut config.data.train_limit,
            self.train_limit,
        )
        .and_then(|_| pin("data.subset", &mut config.data.subset, self.subset))
        .and_then(|_| {
            pin(
                "victim.epochs",
                &mut config.victim.epochs,
                self.victim_epochs,
            )
        })
        .and_then(|_| {
            pin(
                "threat.target_class",
                &mut config.threat.target_class,
                self.target_class,
            )
        })
        .and_then(|_| {
            pin(
                "threat.poison_class",
                &mut config.threat.poison_class,
                self.poison_class,
            )
        });
        pinned.map_err(|e| invalid(e.to_string()))?;
        let threat = &config.threat;
        if !matches!(threat.adv_class, Auto::Auto)
            && threat.adv_class != Auto::Value(self.poison_class)
        {
            return Err(invalid(
                "judges flips to the poison class; remove threat.adv_class from the config".into(),
            ));
        }
        if !matches!(threat.target_ids, Auto::Auto) {
            return Err(invalid(
                "fixes its own targets; remove threat.target_ids from the config".into(),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_built_in_protocols_parse_and_share_targets_and_arms() {
        let standard = Protocol::load("standard").unwrap();
        let gray = Protocol::load("gray-box").unwrap();
        assert_eq!(standard.targets.len(), 10);
        assert_eq!(standard.trials, 8);
        assert!(standard.noise_control);
        assert_eq!(standard.victims.len(), 3);
        // The gray-box tier: the same targets, arms and the standard's ConvNetBN kinds.
        assert_eq!(
            (&gray.targets, gray.trials, gray.noise_control),
            (&standard.targets, standard.trials, standard.noise_control)
        );
        assert!(gray
            .victims
            .iter()
            .all(|v| standard.victims.contains(v) && v.net == NetKind::ConvnetBn));
        assert_eq!(gray.victims.len(), 2);
    }

    #[test]
    fn a_protocol_takes_over_the_classes_and_refuses_a_config_that_contradicts_it() {
        let p = Protocol::load("standard").unwrap();
        let mut c = Config::default();
        p.fit(&mut c).unwrap();
        assert_eq!(
            (c.threat.target_class, c.threat.poison_class),
            (Auto::Value(6), Auto::Value(0))
        );
        assert_eq!(
            (c.data.train_limit, c.data.subset, c.victim.epochs),
            (
                Auto::Value(2000),
                Auto::Value(Subset::First),
                Auto::Value(20)
            )
        );
        let mut longer = Config::default();
        longer.victim.epochs = Auto::Value(200);
        let e = p.fit(&mut longer).unwrap_err().to_string();
        assert!(e.contains("victim.epochs"), "{e}");
        let mut other = Config::default();
        other.threat.poison_class = Auto::Value(3);
        let e = p.fit(&mut other).unwrap_err().to_string();
        assert!(e.contains("threat.poison_class"), "{e}");
        let mut cifar = Config::default();
        cifar.data.dataset = DatasetKind::Cifar10;
        assert!(p
            .fit(&mut cifar)
            .unwrap_err()
            .to_string()
            .contains("data.dataset"));
        let mut ids = Config::default();
        ids.threat.target_ids = Auto::Value(vec![3]);
        assert!(p
            .fit(&mut ids)
            .unwrap_err()
            .to_string()
            .contains("target_ids"));
    }

    #[test]
    fn bad_protocols_are_named() {
        let e = Protocol::load("no-such-protocol").unwrap_err().to_string();
        assert!(
            e.contains("no-such-protocol") && e.contains("standard"),
            "{e}"
        );
        let text = Protocol::load("standard").unwrap();
        let mut doubled = toml::to_string(&text).unwrap();
        doubled.push_str("\n[[victims]]\nnet = \"resnet20\"\nrecipe = \"standard\"\n");
        let e = Protocol::parse(&doubled, "x.toml").unwrap_err().to_string();
        assert!(e.contains("listed twice"), "{e}");
        let e = Protocol::parse("name = 1", "y.toml")
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("protocol y.toml: "), "{e}");
    }
}
