//! `Auto<T>`: a config value that is either the word "auto" (chosen at run time from the
//! hardware or the data set) or an explicit value.

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::fmt;

#[derive(Debug, Clone, PartialEq, Default)]
pub enum Auto<T> {
    #[default]
    Auto,
    Value(T),
}

impl<T: Clone> Auto<T> {
    pub fn resolve(&self, auto: T) -> T {
        match self {
            Auto::Auto => auto,
            Auto::Value(v) => v.clone(),
        }
    }
    pub fn value(&self) -> Option<&T> {
        match self {
            Auto::Auto => None,
            Auto::Value(v) => Some(v),
        }
    }
}

impl<T: Serialize> Serialize for Auto<T> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Auto::Auto => s.serialize_str("auto"),
            Auto::Value(v) => v.serialize(s),
        }
    }
}

impl<'de, T: Deserialize<'de>> Deserialize<'de> for Auto<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw<T> {
            Word(String),
            Value(T),
        }
        match Raw::<T>::deserialize(d) {
            Ok(Raw::Word(w)) if w == "auto" => Ok(Auto::Auto),
            // A word other than "auto" may still be a value (an enum's variant).
            Ok(Raw::Word(w)) => {
                let word = serde::de::value::StrDeserializer::<D::Error>::new(&w);
                T::deserialize(word).map(Auto::Value).map_err(|_| {
                    serde::de::Error::custom(format!("expected \"auto\" or a value, found \"{w}\""))
                })
            }
            Ok(Raw::Value(v)) => Ok(Auto::Value(v)),
            Err(_) => Err(serde::de::Error::custom(
                "expected \"auto\" or a value of the field's type",
            )),
        }
    }
}

impl<T: fmt::Display> fmt::Display for Auto<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Auto::Auto => f.write_str("auto"),
            Auto::Value(v) => v.fmt(f),
        }
    }
}

impl<T> From<T> for Auto<T> {
    fn from(v: T) -> Self {
        Auto::Value(v)
    }
}
