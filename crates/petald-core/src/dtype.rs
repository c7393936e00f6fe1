//! The element types a tensor frame carries. The numeric codes are part of the wire format
//! (petald/v1): never renumber them, only add.

use std::fmt;

/// Element type of a tensor, named as torch names it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum DType {
    F32 = 1,
    F16 = 2,
    BF16 = 3,
    F64 = 4,
    I64 = 5,
    I32 = 6,
    I16 = 7,
    I8 = 8,
    U8 = 9,
    Bool = 10,
}

const ALL: [DType; 10] = [
    DType::F32,
    DType::F16,
    DType::BF16,
    DType::F64,
    DType::I64,
    DType::I32,
    DType::I16,
    DType::I8,
    DType::U8,
    DType::Bool,
];

impl DType {
    pub fn all() -> &'static [DType] {
        &ALL
    }

    pub fn code(self) -> u8 {
        self as u8
    }

    pub fn from_code(code: u8) -> Option<DType> {
        ALL.iter().copied().find(|d| d.code() == code)
    }

    /// Bytes per element.
    pub fn itemsize(self) -> usize {
        match self {
            DType::F64 | DType::I64 => 8,
            DType::F32 | DType::I32 => 4,
            DType::F16 | DType::BF16 | DType::I16 => 2,
            DType::I8 | DType::U8 | DType::Bool => 1,
        }
    }

    /// The torch spelling without the `torch.` prefix ("float32", "bfloat16", ...).
    pub fn name(self) -> &'static str {
        match self {
            DType::F32 => "float32",
            DType::F16 => "float16",
            DType::BF16 => "bfloat16",
            DType::F64 => "float64",
            DType::I64 => "int64",
            DType::I32 => "int32",
            DType::I16 => "int16",
            DType::I8 => "int8",
            DType::U8 => "uint8",
            DType::Bool => "bool",
        }
    }

    /// Accepts the torch spelling, with or without `torch.`, and the short aliases torch has.
    pub fn parse(name: &str) -> Option<DType> {
        let name = name.strip_prefix("torch.").unwrap_or(name);
        let alias = match name {
            "float" => "float32",
            "half" => "float16",
            "double" => "float64",
            "long" => "int64",
            "int" => "int32",
            "short" => "int16",
            other => other,
        };
        ALL.iter().copied().find(|d| d.name() == alias)
    }

    pub fn is_float(self) -> bool {
        matches!(self, DType::F32 | DType::F16 | DType::BF16 | DType::F64)
    }
}

impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_round_trip_and_are_unique() {
        for d in DType::all() {
            assert_eq!(DType::from_code(d.code()), Some(*d));
            assert_eq!(DType::parse(d.name()), Some(*d));
            assert_eq!(DType::parse(&format!("torch.{}", d.name())), Some(*d));
        }
        assert_eq!(DType::from_code(0), None);
        assert_eq!(DType::from_code(200), None);
        assert_eq!(DType::parse("half"), Some(DType::F16));
        assert_eq!(DType::parse("complex64"), None);
    }
}
