//! Which authentication codes a whole batch file names more than once: what lets the dry
//! run of `validate` check a row without writing it.
//!
//! A dry run applies its rows and rolls them back, and it writes only so that later rows
//! see what earlier ones did. A *plain* row (see [`crate::plain`]) that no other row of
//! the file can see needs no write: the query that checks it says all there is to say. Any
//! other row sees a plain row's token only through the authentication codes it holds
//! before and after (named as a key, or set as a new code), or through the token's
//! identifier. So when no row of the file is keyed by identifier, and each code a plain row
//! touches occurs in no other row, nothing else can see that row, and it is only checked.
//!
//! A first pass over the file records every code each row names or sets. The counts live
//! in a fixed-size filter (two bit sets, like a counting Bloom filter saturating at two),
//! so memory does not grow with the file. The filter can mistake a code seen once for one
//! seen twice, which only costs a write; never the other way round, which would make the
//! dry run differ from applying.

use crate::update::{Patch, TokenKey, TokenUpdate};
use std::hash::{Hash, Hasher};

/// Bits in each of the two sets: 2 MiB apiece, which keeps mistakes rare up to millions of
/// rows.
const BITS: usize = 1 << 24;
/// Bits set per code.
const PROBES: u64 = 3;

/// The codes of a file, counted up to two.
pub struct Sightings {
    /// Bits of codes seen at least once.
    seen: Vec<u64>,
    /// Bits of codes seen again: all of a code's bits are set here once it was seen twice.
    seen_again: Vec<u64>,
    /// Whether some row names its token by identifier.
    names_identifiers: bool,
}

impl Default for Sightings {
    fn default() -> Sightings {
        Sightings {
            seen: vec![0; BITS / 64],
            seen_again: vec![0; BITS / 64],
            names_identifiers: false,
        }
    }
}

impl Sightings {
    /// Records the codes one row names or sets, each once.
    pub fn record(&mut self, update: &TokenUpdate) {
        let key = match &update.key {
            TokenKey::AuthenticationCode(code) => Some(code.expose()),
            TokenKey::Identifier { .. } => {
                self.names_identifiers = true;
                None
            }
        };
        if let Some(key) = key {
            self.record_code(key);
        }
        if let Patch::Value(code) = &update.authentication_code
            && Some(code.expose()) != key
        {
            self.record_code(code.expose());
        }
    }

    /// Whether another row of the file could see what the plain row `update` does to its
    /// token: it must then be written.
    pub fn is_seen_by_others(&self, update: &TokenUpdate) -> bool {
        if self.names_identifiers {
            return true;
        }
        let TokenKey::AuthenticationCode(key) = &update.key else {
            return true;
        };
        let new_code = match &update.authentication_code {
            Patch::Value(code) if code != key => Some(code.expose()),
            _ => None,
        };
        [Some(key.expose()), new_code]
            .into_iter()
            .flatten()
            .any(|code| !self.is_seen_once(code))
    }

    fn record_code(&mut self, code: &str) {
        for bit in probes(code) {
            let (word, mask) = (bit / 64, 1 << (bit % 64));
            if self.seen[word] & mask != 0 {
                self.seen_again[word] |= mask;
            }
            self.seen[word] |= mask;
        }
    }

    /// True only when the code was recorded at most once.
    fn is_seen_once(&self, code: &str) -> bool {
        probes(code).any(|bit| self.seen_again[bit / 64] & (1 << (bit % 64)) == 0)
    }
}

/// The bits of a code: two hashes combined (Kirsch and Mitzenmacher).
fn probes(code: &str) -> impl Iterator<Item = usize> {
    let hash = |seed: u64| {
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        seed.hash(&mut hasher);
        code.hash(&mut hasher);
        hasher.finish()
    };
    let (first, step) = (hash(0), hash(1) | 1);
    (0..PROBES).map(move |n| (first.wrapping_add(n.wrapping_mul(step)) % BITS as u64) as usize)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::field::Field;
    use crate::update::{CustomFieldDefinitions, KeyPart, RawValue, UpdateBuilder};

    fn row(key: KeyPart, name: &str, new_code: Option<&str>) -> TokenUpdate {
        let definitions = CustomFieldDefinitions::new();
        let mut builder = UpdateBuilder::new(2, &definitions);
        builder.set_key(key, RawValue::Text(name));
        if key == KeyPart::Identifier {
            builder.set_key(KeyPart::PassCode, RawValue::Text("1234"));
        }
        if let Some(code) = new_code {
            builder.set_field(Field::AuthenticationCode, RawValue::Text(code));
        }
        builder.finish().expect("a valid row")
    }

    fn keyed_by(code: &str) -> TokenUpdate {
        row(KeyPart::AuthenticationCode, code, None)
    }

    fn setting(key: &str, code: &str) -> TokenUpdate {
        row(KeyPart::AuthenticationCode, key, Some(code))
    }

    #[test]
    fn a_row_alone_with_its_codes_is_seen_by_no_other() {
        let mut sightings = Sightings::default();
        let rows: Vec<TokenUpdate> = (0..1000).map(|n| keyed_by(&format!("AC{n}"))).collect();
        for row in &rows {
            sightings.record(row);
        }
        let renamed = setting("B1", "B2");
        let same = setting("C1", "C1");
        sightings.record(&renamed);
        sightings.record(&same);
        assert!(rows.iter().all(|row| !sightings.is_seen_by_others(row)));
        assert!(!sightings.is_seen_by_others(&renamed));
        assert!(!sightings.is_seen_by_others(&same));
    }

    #[test]
    fn a_code_named_or_set_by_two_rows_makes_both_seen() {
        let mut sightings = Sightings::default();
        let (first, second) = (setting("A", "B"), keyed_by("B"));
        let (third, fourth) = (keyed_by("C"), keyed_by("C"));
        for row in [&first, &second, &third, &fourth] {
            sightings.record(row);
        }
        for row in [&first, &second, &third, &fourth] {
            assert!(sightings.is_seen_by_others(row));
        }
    }

    #[test]
    fn a_row_keyed_by_identifier_makes_every_row_seen() {
        let mut sightings = Sightings::default();
        let alone = keyed_by("A");
        sightings.record(&alone);
        assert!(!sightings.is_seen_by_others(&alone));
        sightings.record(&row(KeyPart::Identifier, "member-1", None));
        assert!(sightings.is_seen_by_others(&alone));
    }
}
