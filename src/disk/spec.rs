//! `--volume NAME=PATH[,size=SIZE][,ro]` as typed by an admin.

use std::path::PathBuf;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VolumeSpec {
    pub name: String,
    pub path: PathBuf,
    pub size: Option<u64>,
    pub read_only: bool,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SpecError {
    #[error("volume {0:?}: expected NAME=PATH[,size=SIZE][,ro]")]
    Shape(String),
    #[error("volume name {0:?}: use 1-64 characters from A-Z a-z 0-9 . _ -")]
    Name(String),
    #[error("size {0:?}: expected a number with an optional K, M, G or T suffix (powers of 1024)")]
    Size(String),
    #[error("volume {0:?}: unknown option {1:?} (known: size=SIZE, ro)")]
    Option(String, String),
}

impl std::str::FromStr for VolumeSpec {
    type Err = SpecError;

    fn from_str(s: &str) -> Result<Self, SpecError> {
        let (name, rest) = s
            .split_once('=')
            .ok_or_else(|| SpecError::Shape(s.into()))?;
        let valid = |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-');
        if name.is_empty() || name.len() > 64 || !name.chars().all(valid) {
            return Err(SpecError::Name(name.into()));
        }
        let mut parts = rest.split(',');
        let path = parts
            .next()
            .filter(|p| !p.is_empty())
            .ok_or_else(|| SpecError::Shape(s.into()))?;
        let mut spec = VolumeSpec {
            name: name.into(),
            path: path.into(),
            size: None,
            read_only: false,
        };
        for opt in parts {
            match opt.split_once('=') {
                Some(("size", v)) => spec.size = Some(parse_size(v)?),
                None if opt == "ro" => spec.read_only = true,
                _ => return Err(SpecError::Option(name.into(), opt.into())),
            }
        }
        Ok(spec)
    }
}

/// `4096`, `64K`, `64M`, `10G`, `1T`, also `64MiB` / `64MB` (all powers of 1024).
pub fn parse_size(s: &str) -> Result<u64, SpecError> {
    let err = || SpecError::Size(s.into());
    let t = s.trim();
    let t = t
        .strip_suffix("iB")
        .or_else(|| t.strip_suffix('B'))
        .unwrap_or(t);
    let (digits, shift) = match t.chars().last() {
        Some('k' | 'K') => (&t[..t.len() - 1], 10),
        Some('m' | 'M') => (&t[..t.len() - 1], 20),
        Some('g' | 'G') => (&t[..t.len() - 1], 30),
        Some('t' | 'T') => (&t[..t.len() - 1], 40),
        _ => (t, 0),
    };
    let n: u64 = digits.parse().map_err(|_| err())?;
    let v = n.checked_mul(1u64 << shift).ok_or_else(err)?;
    if v == 0 {
        return Err(err());
    }
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_specs() {
        let v: VolumeSpec = "vol1=/tmp/a.img,size=64M".parse().unwrap();
        assert_eq!(v.name, "vol1");
        assert_eq!(v.path, PathBuf::from("/tmp/a.img"));
        assert_eq!(v.size, Some(64 << 20));
        assert!(!v.read_only);
        let v: VolumeSpec = "r=/dev/sdb,ro".parse().unwrap();
        assert!(v.read_only && v.size.is_none());
    }

    #[test]
    fn rejects_bad_specs_with_reasons() {
        assert!(matches!(
            "novalue".parse::<VolumeSpec>(),
            Err(SpecError::Shape(_))
        ));
        assert!(matches!(
            "a b=/x".parse::<VolumeSpec>(),
            Err(SpecError::Name(_))
        ));
        assert!(matches!(
            "a=".parse::<VolumeSpec>(),
            Err(SpecError::Shape(_))
        ));
        assert!(matches!(
            "a=/x,size=12Q".parse::<VolumeSpec>(),
            Err(SpecError::Size(_))
        ));
        assert!(matches!(
            "a=/x,colour=red".parse::<VolumeSpec>(),
            Err(SpecError::Option(..))
        ));
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("10G"), Ok(10 << 30));
        assert_eq!(parse_size("64MiB"), Ok(64 << 20));
        assert_eq!(parse_size("1t"), Ok(1 << 40));
        assert!(parse_size("0").is_err());
        assert!(parse_size("99999999999T").is_err());
    }
}
