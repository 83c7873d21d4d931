//! Pass codes and authentication codes: Argon2id hashing and verification, run on blocking
//! threads so they never stall the async workers, and random codes from a cryptographic
//! source.

use crate::update::Secret;
use argon2::Argon2;
use argon2::password_hash::{PasswordHasher, PasswordVerifier};
use rand::Rng;

/// The characters of a generated authentication code.
const CODE_ALPHABET: &[u8; 36] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789";

/// The length of a generated authentication code.
pub const GENERATED_CODE_LEN: usize = 16;

/// Hashes a pass code with Argon2id and a fresh random salt, as a PHC string.
///
/// # Panics
/// If the blocking thread panics, or Argon2 refuses a pass code of 1 to 128 bytes (it takes
/// up to 4 GiB).
pub async fn hash_pass_code(pass_code: Secret) -> String {
    tokio::task::spawn_blocking(move || hash_pass_code_blocking(&pass_code))
        .await
        .expect("the hashing thread does not panic")
}

/// [`hash_pass_code`] on the calling thread.
pub fn hash_pass_code_blocking(pass_code: &Secret) -> String {
    Argon2::default()
        .hash_password(pass_code.expose().as_bytes())
        .expect("Argon2 hashes any pass code of up to 128 bytes")
        .to_string()
}

/// Whether `pass_code` matches the stored PHC string; a hash that cannot be parsed matches
/// nothing.
///
/// # Panics
/// If the blocking thread panics.
pub async fn verify_pass_code(pass_code: Secret, hash: String) -> bool {
    tokio::task::spawn_blocking(move || {
        Argon2::default()
            .verify_password(pass_code.expose().as_bytes(), hash.as_str())
            .is_ok()
    })
    .await
    .expect("the verifying thread does not panic")
}

/// A new authentication code: 16 characters from `A-Z0-9`, drawn uniformly from the
/// thread's cryptographically secure generator (seeded by the operating system).
pub fn generate_authentication_code() -> String {
    let mut rng = rand::rng();
    (0..GENERATED_CODE_LEN)
        .map(|_| char::from(CODE_ALPHABET[rng.random_range(0..CODE_ALPHABET.len())]))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_hash_verifies_its_own_pass_code_only() {
        let hash = hash_pass_code(Secret::new("s3cret")).await;
        assert!(hash.starts_with("$argon2id$"));
        assert!(!hash.contains("s3cret"));
        assert!(verify_pass_code(Secret::new("s3cret"), hash.clone()).await);
        assert!(!verify_pass_code(Secret::new("s3cret!"), hash).await);
        assert!(!verify_pass_code(Secret::new("x"), "not a hash".into()).await);
    }

    #[test]
    fn generated_codes_have_the_right_shape() {
        let code = generate_authentication_code();
        assert_eq!(code.len(), GENERATED_CODE_LEN);
        assert!(code.bytes().all(|b| CODE_ALPHABET.contains(&b)));
        assert_ne!(code, generate_authentication_code());
    }
}
