//! [`Str`]: an immutable string shared by reference count.
//!
//! It behaves as the `String` it replaced in every way the rules and the sinks observe:
//! equality, ordering and hashing are those of the text (so sorted outputs, `BTreeMap`s
//! and hash partitioning do not change), `Debug` and `Display` print what `String` prints,
//! and serde reads and writes it as a JSON string. Only `clone` differs: an atomic
//! increment instead of an allocation and a copy (13 % of the end-to-end CPU profile was
//! `String::clone` before this type, docs/engine.md).

use std::borrow::Borrow;
use std::fmt;
use std::ops::Deref;
use std::sync::Arc;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// An immutable string, cloned by reference count (16 bytes, one allocation for the text).
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Str(Arc<str>);

impl Str {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl Default for Str {
    /// The empty string, shared: no allocation per call.
    fn default() -> Self {
        static EMPTY: std::sync::OnceLock<Arc<str>> = std::sync::OnceLock::new();
        Str(EMPTY.get_or_init(|| Arc::from("")).clone())
    }
}

impl Deref for Str {
    type Target = str;
    fn deref(&self) -> &str {
        &self.0
    }
}

impl AsRef<str> for Str {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl Borrow<str> for Str {
    fn borrow(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Str {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&*self.0, f)
    }
}

impl fmt::Display for Str {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&*self.0, f)
    }
}

impl From<&str> for Str {
    fn from(s: &str) -> Self {
        Str(Arc::from(s))
    }
}

impl From<String> for Str {
    fn from(s: String) -> Self {
        Str(Arc::from(s))
    }
}

impl From<&Str> for Str {
    fn from(s: &Str) -> Self {
        s.clone()
    }
}

impl From<&String> for Str {
    fn from(s: &String) -> Self {
        Str(Arc::from(s.as_str()))
    }
}

impl From<std::borrow::Cow<'_, str>> for Str {
    fn from(s: std::borrow::Cow<'_, str>) -> Self {
        Str(Arc::from(s.as_ref()))
    }
}

impl From<Str> for String {
    fn from(s: Str) -> String {
        s.0.to_string()
    }
}

impl PartialEq<str> for Str {
    fn eq(&self, other: &str) -> bool {
        &*self.0 == other
    }
}

impl PartialEq<&str> for Str {
    fn eq(&self, other: &&str) -> bool {
        &*self.0 == *other
    }
}

impl PartialEq<String> for Str {
    fn eq(&self, other: &String) -> bool {
        *self.0 == **other
    }
}

impl PartialEq<Str> for str {
    fn eq(&self, other: &Str) -> bool {
        self == &*other.0
    }
}

impl PartialEq<Str> for &str {
    fn eq(&self, other: &Str) -> bool {
        *self == &*other.0
    }
}

impl PartialEq<Str> for String {
    fn eq(&self, other: &Str) -> bool {
        **self == *other.0
    }
}

impl Serialize for Str {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for Str {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d).map(Str::from)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::hash_map::DefaultHasher;
    use std::hash::{Hash, Hasher};

    fn hash<T: Hash + ?Sized>(t: &T) -> u64 {
        let mut h = DefaultHasher::new();
        t.hash(&mut h);
        h.finish()
    }

    #[test]
    fn behaves_as_the_string_it_holds() {
        let words = ["", "a", "B", "b", "ab", "ä", "0f8f-x", "\u{1F600}", "z\"q"];
        for x in words {
            let s = Str::from(x);
            assert_eq!(format!("{s:?}"), format!("{:?}", x.to_string()));
            assert_eq!(format!("{s}"), x);
            assert_eq!(hash(&s), hash(&x.to_string()), "{x:?}");
            assert_eq!(
                serde_json::to_string(&s).unwrap(),
                serde_json::to_string(x).unwrap()
            );
            let back: Str = serde_json::from_str(&serde_json::to_string(x).unwrap()).unwrap();
            assert_eq!(back, s);
            for y in words {
                let (a, b) = (Str::from(x), Str::from(y));
                assert_eq!(a.cmp(&b), x.cmp(y), "{x:?} {y:?}");
                assert_eq!(a == b, x == y);
            }
        }
        let e = serde_json::from_str::<Str>("1").unwrap_err().to_string();
        assert_eq!(
            e,
            serde_json::from_str::<String>("1").unwrap_err().to_string()
        );
    }

    #[test]
    fn clones_share_the_text() {
        let s = Str::from("task-1");
        let c = s.clone();
        assert!(std::ptr::eq(s.as_str().as_ptr(), c.as_str().as_ptr()));
        assert_eq!(std::mem::size_of::<Str>(), 16);
        assert_eq!(std::mem::size_of::<Option<Str>>(), 16);
    }
}
