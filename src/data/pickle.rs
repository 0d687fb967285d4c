//! A restricted reader for Python pickles: enough of the format to read the data files other
//! tools ship as pickles (CIFAR-10's python version) without Python. It never imports or calls
//! anything: a `GLOBAL` is kept as its module and name, a `REDUCE` as the call it describes and a
//! `BUILD` as the object with its state, and the caller recognises the few shapes it expects
//! (a numpy array is `_reconstruct(...)` built with a state tuple). Lengths are checked against
//! the input before anything is allocated, so a damaged file gives an error, not a huge
//! allocation or a panic.

use std::borrow::Cow;
use std::collections::HashMap;

/// The opcodes this reader knows, and `export::native` writes (names as in CPython's
/// `pickletools`).
pub(crate) mod op {
    pub const PROTO: u8 = 0x80;
    pub const FRAME: u8 = 0x95;
    pub const STOP: u8 = b'.';
    pub const MARK: u8 = b'(';
    pub const POP: u8 = b'0';
    pub const POP_MARK: u8 = b'1';
    pub const DUP: u8 = b'2';
    pub const BINPUT: u8 = b'q';
    pub const LONG_BINPUT: u8 = b'r';
    pub const MEMOIZE: u8 = 0x94;
    pub const BINGET: u8 = b'h';
    pub const LONG_BINGET: u8 = b'j';
    pub const NONE: u8 = b'N';
    pub const NEWTRUE: u8 = 0x88;
    pub const NEWFALSE: u8 = 0x89;
    pub const BININT: u8 = b'J';
    pub const BININT1: u8 = b'K';
    pub const BININT2: u8 = b'M';
    pub const LONG1: u8 = 0x8a;
    pub const BINFLOAT: u8 = b'G';
    pub const SHORT_BINSTRING: u8 = b'U';
    pub const SHORT_BINBYTES: u8 = b'C';
    pub const BINSTRING: u8 = b'T';
    pub const BINBYTES: u8 = b'B';
    pub const BINBYTES8: u8 = 0x8e;
    pub const BYTEARRAY8: u8 = 0x96;
    pub const SHORT_BINUNICODE: u8 = 0x8c;
    pub const BINUNICODE: u8 = b'X';
    pub const BINUNICODE8: u8 = 0x8d;
    pub const EMPTY_TUPLE: u8 = b')';
    pub const TUPLE: u8 = b't';
    pub const TUPLE1: u8 = 0x85;
    pub const TUPLE2: u8 = 0x86;
    pub const TUPLE3: u8 = 0x87;
    pub const EMPTY_LIST: u8 = b']';
    pub const LIST: u8 = b'l';
    pub const APPEND: u8 = b'a';
    pub const APPENDS: u8 = b'e';
    pub const EMPTY_DICT: u8 = b'}';
    pub const DICT: u8 = b'd';
    pub const SETITEM: u8 = b's';
    pub const SETITEMS: u8 = b'u';
    pub const GLOBAL: u8 = b'c';
    pub const STACK_GLOBAL: u8 = 0x93;
    pub const REDUCE: u8 = b'R';
    pub const BUILD: u8 = b'b';
}

/// One object in the pickle; containers hold indices into [`Pickle::objects`], so that the
/// memo (which shares objects) and in-place mutation (APPENDS, SETITEMS, BUILD) work as in
/// Python.
#[derive(Debug, Clone, PartialEq)]
pub enum Obj<'a> {
    None,
    Bool(bool),
    Int(i64),
    Float(f64),
    /// Python 2 `str`, Python 3 `bytes` and `bytearray`: borrowed from the input.
    Bytes(&'a [u8]),
    Str(String),
    Tuple(Vec<usize>),
    List(Vec<usize>),
    Dict(Vec<(usize, usize)>),
    Global {
        module: String,
        name: String,
    },
    /// `func(*args)`, not called.
    Reduce {
        func: usize,
        args: usize,
    },
    /// `object.__setstate__(state)`, not called.
    Build {
        object: usize,
        state: usize,
    },
}

/// A decoded pickle: every object, and the one STOP returned.
#[derive(Debug)]
pub struct Pickle<'a> {
    pub objects: Vec<Obj<'a>>,
    pub root: usize,
}

/// Why a pickle could not be read; `at` is the byte offset of the opcode.
#[derive(Debug, thiserror::Error)]
#[error("pickle byte {at}: {message}")]
pub struct PickleError {
    pub at: usize,
    pub message: String,
}

struct Reader<'a> {
    bytes: &'a [u8],
    pos: usize,
    op_at: usize,
    objects: Vec<Obj<'a>>,
    stack: Vec<usize>,
    marks: Vec<usize>,
    memo: HashMap<u64, usize>,
}

impl<'a> Reader<'a> {
    fn fail<T>(&self, message: impl Into<String>) -> Result<T, PickleError> {
        Err(PickleError {
            at: self.op_at,
            message: message.into(),
        })
    }
    fn take(&mut self, n: u64) -> Result<&'a [u8], PickleError> {
        let left = (self.bytes.len() - self.pos) as u64;
        if n > left {
            return self.fail(format!(
                "needs {n} more bytes, the file has {left} left (truncated?)"
            ));
        }
        let s = &self.bytes[self.pos..self.pos + n as usize];
        self.pos += n as usize;
        Ok(s)
    }
    fn u8(&mut self) -> Result<u8, PickleError> {
        Ok(self.take(1)?[0])
    }
    fn le(&mut self, n: usize) -> Result<u64, PickleError> {
        let s = self.take(n as u64)?;
        Ok(s.iter().rev().fold(0u64, |acc, &b| (acc << 8) | b as u64))
    }
    fn line(&mut self) -> Result<String, PickleError> {
        let rest = &self.bytes[self.pos..];
        let Some(end) = rest.iter().position(|&b| b == b'\n') else {
            return self.fail("a GLOBAL's name has no end of line");
        };
        self.pos += end + 1;
        match std::str::from_utf8(&rest[..end]) {
            Ok(s) => Ok(s.to_string()),
            Err(_) => self.fail("a GLOBAL's name is not text"),
        }
    }
    fn utf8(&self, s: &[u8]) -> Result<String, PickleError> {
        match std::str::from_utf8(s) {
            Ok(s) => Ok(s.to_string()),
            Err(_) => self.fail("a unicode string is not UTF-8"),
        }
    }
    fn push(&mut self, obj: Obj<'a>) {
        self.objects.push(obj);
        self.stack.push(self.objects.len() - 1);
    }
    fn pop(&mut self) -> Result<usize, PickleError> {
        let floor = self.marks.last().copied().unwrap_or(0);
        if self.stack.len() <= floor {
            return self.fail("stack underflow");
        }
        Ok(self.stack.pop().expect("checked above"))
    }
    fn top(&self) -> Result<usize, PickleError> {
        match self.stack.last() {
            Some(&i) => Ok(i),
            None => self.fail("stack underflow"),
        }
    }
    fn pop_mark(&mut self) -> Result<Vec<usize>, PickleError> {
        let Some(mark) = self.marks.pop() else {
            return self.fail("no MARK to pop to");
        };
        Ok(self.stack.split_off(mark))
    }
    fn memo_get(&mut self, key: u64) -> Result<(), PickleError> {
        match self.memo.get(&key) {
            Some(&i) => {
                self.stack.push(i);
                Ok(())
            }
            None => self.fail(format!("memo entry {key} was never stored")),
        }
    }
    fn memo_put(&mut self, key: u64) -> Result<(), PickleError> {
        let top = self.top()?;
        self.memo.insert(key, top);
        Ok(())
    }
    fn append(&mut self, items: Vec<usize>) -> Result<(), PickleError> {
        let list = self.top()?;
        match &mut self.objects[list] {
            Obj::List(v) => {
                v.extend(items);
                Ok(())
            }
            _ => self.fail("APPEND to something that is not a list"),
        }
    }
    fn set_items(&mut self, items: Vec<usize>) -> Result<(), PickleError> {
        if items.len() % 2 != 0 {
            return self.fail("SETITEMS with an odd number of items");
        }
        let dict = self.top()?;
        match &mut self.objects[dict] {
            Obj::Dict(d) => {
                d.extend(items.chunks_exact(2).map(|kv| (kv[0], kv[1])));
                Ok(())
            }
            _ => self.fail("SETITEM on something that is not a dict"),
        }
    }
    fn tuple_of(&mut self, n: usize) -> Result<(), PickleError> {
        let mut items = Vec::with_capacity(n);
        for _ in 0..n {
            items.push(self.pop()?);
        }
        items.reverse();
        self.push(Obj::Tuple(items));
        Ok(())
    }

    fn run(mut self) -> Result<Pickle<'a>, PickleError> {
        loop {
            self.op_at = self.pos;
            if self.pos == self.bytes.len() {
                return self.fail("the file ends before the pickle's STOP (truncated?)");
            }
            let op = self.u8()?;
            match op {
                op::PROTO => {
                    let protocol = self.u8()?;
                    if protocol > 5 {
                        return self.fail(format!("pickle protocol {protocol}, at most 5 known"));
                    }
                }
                op::FRAME => {
                    self.take(8)?; // FRAME: a length hint only
                }
                op::STOP => {
                    let root = self.pop()?;
                    return Ok(Pickle {
                        objects: self.objects,
                        root,
                    });
                }
                op::MARK => self.marks.push(self.stack.len()),
                op::POP => {
                    self.pop()?;
                }
                op::POP_MARK => {
                    self.pop_mark()?;
                }
                op::DUP => {
                    let top = self.top()?;
                    self.stack.push(top);
                }
                op::BINPUT => {
                    let k = self.u8()? as u64;
                    self.memo_put(k)?;
                }
                op::LONG_BINPUT => {
                    let k = self.le(4)?;
                    self.memo_put(k)?;
                }
                op::MEMOIZE => {
                    let k = self.memo.len() as u64;
                    self.memo_put(k)?;
                }
                op::BINGET => {
                    let k = self.u8()? as u64;
                    self.memo_get(k)?;
                }
                op::LONG_BINGET => {
                    let k = self.le(4)?;
                    self.memo_get(k)?;
                }
                op::NONE => self.push(Obj::None),
                op::NEWTRUE => self.push(Obj::Bool(true)),
                op::NEWFALSE => self.push(Obj::Bool(false)),
                op::BININT => {
                    let v = self.le(4)? as u32 as i32 as i64;
                    self.push(Obj::Int(v));
                }
                op::BININT1 => {
                    let v = self.u8()? as i64;
                    self.push(Obj::Int(v));
                }
                op::BININT2 => {
                    let v = self.le(2)? as i64;
                    self.push(Obj::Int(v));
                }
                op::LONG1 => {
                    // LONG1: little-endian two's complement of n bytes.
                    let n = self.u8()? as usize;
                    if n > 8 {
                        return self.fail(format!("an integer of {n} bytes does not fit 64 bits"));
                    }
                    let raw = self.le(n)?;
                    let v = if n == 0 {
                        0
                    } else {
                        let shift = 64 - 8 * n as u32;
                        ((raw << shift) as i64) >> shift
                    };
                    self.push(Obj::Int(v));
                }
                op::BINFLOAT => {
                    let s = self.take(8)?;
                    let v = f64::from_be_bytes(s.try_into().expect("8 bytes"));
                    self.push(Obj::Float(v));
                }
                op::SHORT_BINSTRING | op::SHORT_BINBYTES => {
                    let n = self.u8()? as u64;
                    let s = self.take(n)?;
                    self.push(Obj::Bytes(s));
                }
                op::BINSTRING => {
                    let n = self.le(4)? as u32 as i32;
                    if n < 0 {
                        return self.fail("a string of negative length");
                    }
                    let s = self.take(n as u64)?;
                    self.push(Obj::Bytes(s));
                }
                op::BINBYTES => {
                    let n = self.le(4)?;
                    let s = self.take(n)?;
                    self.push(Obj::Bytes(s));
                }
                op::BINBYTES8 | op::BYTEARRAY8 => {
                    let n = self.le(8)?;
                    let s = self.take(n)?;
                    self.push(Obj::Bytes(s));
                }
                op::SHORT_BINUNICODE | op::BINUNICODE | op::BINUNICODE8 => {
                    let n = match op {
                        op::SHORT_BINUNICODE => self.u8()? as u64,
                        op::BINUNICODE => self.le(4)?,
                        _ => self.le(8)?,
                    };
                    let s = self.take(n)?;
                    let s = self.utf8(s)?;
                    self.push(Obj::Str(s));
                }
                op::EMPTY_TUPLE => self.push(Obj::Tuple(Vec::new())),
                op::TUPLE => {
                    let items = self.pop_mark()?;
                    self.push(Obj::Tuple(items));
                }
                op::TUPLE1 => self.tuple_of(1)?,
                op::TUPLE2 => self.tuple_of(2)?,
                op::TUPLE3 => self.tuple_of(3)?,
                op::EMPTY_LIST => self.push(Obj::List(Vec::new())),
                op::LIST => {
                    let items = self.pop_mark()?;
                    self.push(Obj::List(items));
                }
                op::APPEND => {
                    let item = self.pop()?;
                    self.append(vec![item])?;
                }
                op::APPENDS => {
                    let items = self.pop_mark()?;
                    self.append(items)?;
                }
                op::EMPTY_DICT => self.push(Obj::Dict(Vec::new())),
                op::DICT => {
                    let items = self.pop_mark()?;
                    self.push(Obj::Dict(Vec::new()));
                    self.set_items(items)?;
                }
                op::SETITEM => {
                    let value = self.pop()?;
                    let key = self.pop()?;
                    self.set_items(vec![key, value])?;
                }
                op::SETITEMS => {
                    let items = self.pop_mark()?;
                    self.set_items(items)?;
                }
                op::GLOBAL => {
                    let module = self.line()?;
                    let name = self.line()?;
                    self.push(Obj::Global { module, name });
                }
                op::STACK_GLOBAL => {
                    let name = self.pop()?;
                    let module = self.pop()?;
                    match (&self.objects[module], &self.objects[name]) {
                        (Obj::Str(m), Obj::Str(n)) => {
                            let (module, name) = (m.clone(), n.clone());
                            self.push(Obj::Global { module, name });
                        }
                        _ => return self.fail("STACK_GLOBAL without two strings"),
                    }
                }
                op::REDUCE => {
                    let args = self.pop()?;
                    let func = self.pop()?;
                    self.push(Obj::Reduce { func, args });
                }
                op::BUILD => {
                    // The object stays where it is (the memo may share it); it becomes a Build.
                    let state = self.pop()?;
                    let target = self.top()?;
                    let inner = std::mem::replace(&mut self.objects[target], Obj::None);
                    self.objects.push(inner);
                    let object = self.objects.len() - 1;
                    self.objects[target] = Obj::Build { object, state };
                }
                other => {
                    return self.fail(format!(
                        "opcode 0x{other:02x} is not one this reader knows (only the binary protocols' data opcodes are)"
                    ))
                }
            }
        }
    }
}

/// Decodes a pickle (protocols 2 to 5, and the binary opcodes of 1).
pub fn parse(bytes: &[u8]) -> Result<Pickle<'_>, PickleError> {
    Reader {
        bytes,
        pos: 0,
        op_at: 0,
        objects: Vec::new(),
        stack: Vec::new(),
        marks: Vec::new(),
        memo: HashMap::new(),
    }
    .run()
}

/// A numpy array read from a pickle: C order, its shape, numpy's dtype string and raw bytes.
#[derive(Debug, PartialEq)]
pub struct Array<'a> {
    pub shape: Vec<usize>,
    pub dtype: String,
    pub data: Cow<'a, [u8]>,
}

impl<'a> Pickle<'a> {
    pub fn get(&self, i: usize) -> &Obj<'a> {
        &self.objects[i]
    }

    /// The value under `key` in the dict at `dict`, matching a Python 2 `str` / Python 3
    /// `bytes` key or a unicode one.
    pub fn dict_get(&self, dict: usize, key: &str) -> Option<usize> {
        let Obj::Dict(items) = self.get(dict) else {
            return None;
        };
        items.iter().find_map(|&(k, v)| {
            let same = match self.get(k) {
                Obj::Bytes(b) => *b == key.as_bytes(),
                Obj::Str(s) => s == key,
                _ => false,
            };
            same.then_some(v)
        })
    }

    /// Bytes, or text the way Python 3 pickles bytes at protocol 2: `_codecs.encode(s,
    /// "latin1")`.
    pub fn bytes(&self, i: usize) -> Option<Cow<'a, [u8]>> {
        match self.get(i) {
            Obj::Bytes(b) => Some(Cow::Borrowed(*b)),
            Obj::Reduce { func, args } if self.is_global(*func, &["_codecs"], "encode") => {
                let Obj::Tuple(a) = self.get(*args) else {
                    return None;
                };
                let (Some(Obj::Str(text)), Some(Obj::Str(codec))) = (
                    a.first().map(|&i| self.get(i)),
                    a.get(1).map(|&i| self.get(i)),
                ) else {
                    return None;
                };
                if codec != "latin1" && codec != "latin-1" {
                    return None;
                }
                text.chars()
                    .map(|c| u8::try_from(c as u32).ok())
                    .collect::<Option<Vec<u8>>>()
                    .map(Cow::Owned)
            }
            _ => None,
        }
    }

    pub fn text(&self, i: usize) -> Option<String> {
        match self.get(i) {
            Obj::Str(s) => Some(s.clone()),
            Obj::Bytes(b) => Some(String::from_utf8_lossy(b).into_owned()),
            _ => None,
        }
    }

    pub fn int(&self, i: usize) -> Option<i64> {
        match self.get(i) {
            Obj::Int(v) => Some(*v),
            _ => None,
        }
    }

    fn items(&self, i: usize) -> Option<&[usize]> {
        match self.get(i) {
            Obj::Tuple(v) | Obj::List(v) => Some(v),
            _ => None,
        }
    }

    /// Integers of a list or tuple.
    pub fn ints(&self, i: usize) -> Option<Vec<i64>> {
        self.items(i)?.iter().map(|&j| self.int(j)).collect()
    }

    fn is_global(&self, i: usize, modules: &[&str], name: &str) -> bool {
        matches!(self.get(i), Obj::Global { module, name: n }
            if n == name && modules.contains(&module.as_str()))
    }

    /// numpy's dtype string of `numpy.dtype("u1", ...)`, built or not.
    fn dtype(&self, i: usize) -> Option<String> {
        let call = match self.get(i) {
            Obj::Build { object, .. } => *object,
            _ => i,
        };
        let Obj::Reduce { func, args } = self.get(call) else {
            return None;
        };
        if !self.is_global(*func, &["numpy"], "dtype") {
            return None;
        }
        self.text(*self.items(*args)?.first()?)
    }

    /// A numpy array, in either of the forms numpy pickles one: `_reconstruct(ndarray, (0,),
    /// b"b")` built with `(version, shape, dtype, fortran_order, data)`, or (protocol 5)
    /// `_frombuffer(data, dtype, shape, order)`. Err says what the object is instead.
    pub fn array(&self, i: usize) -> Result<Array<'a>, NotAnArray> {
        const MULTIARRAY: [&str; 2] = ["numpy.core.multiarray", "numpy._core.multiarray"];
        const NUMERIC: [&str; 2] = ["numpy.core.numeric", "numpy._core.numeric"];
        let shape_of = |j: usize| -> Result<Vec<usize>, NotAnArray> {
            self.ints(j)
                .and_then(|v| v.into_iter().map(|d| usize::try_from(d).ok()).collect())
                .ok_or(NotAnArray("its shape is not a tuple of sizes".into()))
        };
        let (shape, dtype, data) = match self.get(i) {
            Obj::Build { object, state } => {
                let is_array = matches!(self.get(*object), Obj::Reduce { func, .. }
                    if self.is_global(*func, &MULTIARRAY, "_reconstruct"));
                if !is_array {
                    return Err(NotAnArray("an object that is not a numpy array".into()));
                }
                let s = self
                    .items(*state)
                    .ok_or(NotAnArray("a numpy array without its state".into()))?;
                // (version, shape, dtype, fortran, data); very old numpy left the version out.
                let s = if s.len() == 5 { &s[1..] } else { s };
                if s.len() != 4 {
                    return Err(NotAnArray(format!(
                        "a numpy array state of {} items",
                        s.len()
                    )));
                }
                if self.get(s[2]) != &Obj::Bool(false) {
                    return Err(NotAnArray("a Fortran-order numpy array".into()));
                }
                (shape_of(s[0])?, s[1], s[3])
            }
            Obj::Reduce { func, args } if self.is_global(*func, &NUMERIC, "_frombuffer") => {
                let a = self
                    .items(*args)
                    .ok_or(NotAnArray("_frombuffer without arguments".into()))?;
                if a.len() != 4 {
                    return Err(NotAnArray(format!(
                        "_frombuffer with {} arguments",
                        a.len()
                    )));
                }
                if self.text(a[3]).as_deref() != Some("C") {
                    return Err(NotAnArray("a numpy array not in C order".into()));
                }
                (shape_of(a[2])?, a[1], a[0])
            }
            Obj::List(_) => return Err(NotAnArray("a list, not a numpy array".into())),
            _ => return Err(NotAnArray("not a numpy array".into())),
        };
        let dtype = self
            .dtype(dtype)
            .ok_or(NotAnArray("a numpy array of an unreadable dtype".into()))?;
        let data = self
            .bytes(data)
            .ok_or(NotAnArray("a numpy array without its bytes".into()))?;
        Ok(Array { shape, dtype, data })
    }
}

/// What a pickled object is instead of the numpy array expected there.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct NotAnArray(pub String);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_memo_shares_one_list_with_its_appends() {
        // PROTO 2, EMPTY_LIST, BINPUT 0, MARK, BININT1 7, BININT2 300, BININT -5, APPENDS,
        // BINGET 0, TUPLE2, STOP: ([7, 300, -5], same list).
        let bytes = b"\x80\x02]q\x00(K\x07M\x2c\x01J\xfb\xff\xff\xffeh\x00\x86.";
        let p = parse(bytes).unwrap();
        let Obj::Tuple(t) = p.get(p.root) else {
            panic!("{:?}", p.get(p.root))
        };
        assert_eq!(t[0], t[1]);
        assert_eq!(p.ints(t[0]).unwrap(), vec![7, 300, -5]);
    }

    #[test]
    fn long1_is_twos_complement() {
        for (bytes, want) in [
            (&b"\x8a\x00."[..], 0i64),
            (b"\x8a\x01\xff.", -1),
            (b"\x8a\x02\x00\x80.", -32768),
            (b"\x8a\x05\x00\x00\x00\x00\x01.", 1 << 32),
        ] {
            let p = parse(bytes).unwrap();
            assert_eq!(p.int(p.root), Some(want), "{bytes:?}");
        }
    }

    #[test]
    fn damaged_pickles_are_errors_with_offsets() {
        // A BINSTRING that claims 1 GB.
        let e = parse(b"\x80\x02T\x00\x00\x00\x40ab").unwrap_err();
        assert_eq!(e.at, 2);
        assert!(e.message.contains("truncated"), "{e}");
        // No STOP.
        let e = parse(b"\x80\x02K\x01").unwrap_err();
        assert!(e.message.contains("STOP") && e.at == 4, "{e}");
        // An opcode outside the set: INST ('i') would import and call.
        let e = parse(b"\x80\x02(ios\nsystem\n.").unwrap_err();
        assert!(e.message.contains("0x69") && e.at == 3, "{e}");
        // APPENDS onto a dict; BINGET of a memo entry never stored; STOP on an empty stack.
        assert!(parse(b"}(K\x01e.")
            .unwrap_err()
            .message
            .contains("not a list"));
        assert!(parse(b"h\x05.")
            .unwrap_err()
            .message
            .contains("memo entry 5"));
        assert!(parse(b".").unwrap_err().message.contains("underflow"));
    }

    #[test]
    fn codecs_encode_gives_latin1_bytes() {
        // _codecs.encode("\xff\x00a", "latin1") as Python 3 writes bytes at protocol 2.
        let bytes = "\u{80}\u{2}c_codecs\nencode\nX\u{4}\u{0}\u{0}\u{0}\u{c3}\u{bf}\u{0}aX\u{6}\u{0}\u{0}\u{0}latin1\u{86}R.";
        let bytes: Vec<u8> = bytes.chars().map(|c| c as u32 as u8).collect();
        let p = parse(&bytes).unwrap();
        assert_eq!(p.bytes(p.root).unwrap().as_ref(), &[0xff, 0x00, b'a']);
    }
}
