//! Pass codes and authentication codes: Argon2id hashing and verification, run on a fixed
//! pool of worker threads (one per core) so they never stall the async workers and their
//! memory stays bounded, and random codes from a cryptographic source.

use crate::update::Secret;
use argon2::Argon2;
use argon2::password_hash::{PasswordHasher, PasswordVerifier};
use rand::Rng;
use std::sync::{Arc, Mutex, OnceLock, PoisonError, mpsc};
use tokio::sync::oneshot;

/// The characters of a generated authentication code.
const CODE_ALPHABET: &[u8; 36] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789";

/// What a dry run (`validate`) stores instead of the hash of a new pass code: its
/// transaction is never committed, so the ~30 ms of a real hash would be wasted.
pub const DRY_RUN_HASH: &str = "$dry-run$";

/// The length of a generated authentication code.
pub const GENERATED_CODE_LEN: usize = 16;

/// Hashes a pass code with Argon2id and a fresh random salt, as a PHC string.
///
/// # Panics
/// If the blocking thread panics, or Argon2 refuses a pass code of 1 to 128 bytes (it takes
/// up to 4 GiB).
pub async fn hash_pass_code(pass_code: Secret) -> String {
    on_worker(move || hash_pass_code_blocking(&pass_code)).await
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

/// Hashes many pass codes across every core, keeping their order.
///
/// # Panics
/// If a hashing thread panics.
pub async fn hash_many(pass_codes: Vec<Secret>) -> Vec<String> {
    across_cores(pass_codes, |pass_code| hash_pass_code_blocking(&pass_code)).await
}

/// The hashes to store for these pass codes, in order: [`hash_many`], or in a dry run, which
/// keeps nothing, [`DRY_RUN_HASH`] for each without the cost of hashing.
pub async fn hashes_for(pass_codes: Vec<Secret>, is_dry_run: bool) -> Vec<String> {
    match is_dry_run {
        true => vec![DRY_RUN_HASH.to_owned(); pass_codes.len()],
        false => hash_many(pass_codes).await,
    }
}

/// Verifies many (pass code, stored hash) pairs across every core, keeping their order.
///
/// # Panics
/// If a verifying thread panics.
pub async fn verify_many(pairs: Vec<(Secret, String)>) -> Vec<bool> {
    across_cores(pairs, |(pass_code, hash)| {
        Argon2::default()
            .verify_password(pass_code.expose().as_bytes(), hash.as_str())
            .is_ok()
    })
    .await
}

/// Runs `work` on every item across the Argon2 workers, one share per worker, and gives
/// the results in order.
async fn across_cores<T, R>(items: Vec<T>, work: fn(T) -> R) -> Vec<R>
where
    T: Send + 'static,
    R: Send + 'static,
{
    let per_worker = items.len().div_ceil(worker_count()).max(1);
    let mut shares = Vec::with_capacity(worker_count());
    let mut items = items.into_iter();
    loop {
        let share: Vec<T> = items.by_ref().take(per_worker).collect();
        if share.is_empty() {
            break;
        }
        shares.push(on_worker(move || {
            share.into_iter().map(work).collect::<Vec<R>>()
        }));
    }
    let mut results = Vec::new();
    for share in shares {
        results.extend(share.await);
    }
    results
}

/// A job for an Argon2 worker.
type Job = Box<dyn FnOnce() + Send>;

/// One long-lived thread per core runs every hash and verification. Argon2id takes ~19 MiB
/// per running hash; a fixed set of threads reuses that memory, where short-lived blocking
/// threads would each leave their own behind in the allocator.
fn workers() -> &'static Mutex<mpsc::Sender<Job>> {
    static WORKERS: OnceLock<Mutex<mpsc::Sender<Job>>> = OnceLock::new();
    WORKERS.get_or_init(|| {
        let (sender, receiver) = mpsc::channel::<Job>();
        let receiver = Arc::new(Mutex::new(receiver));
        for i in 0..worker_count() {
            let receiver = Arc::clone(&receiver);
            std::thread::Builder::new()
                .name(format!("argon2-{i}"))
                .spawn(move || {
                    loop {
                        let job = receiver
                            .lock()
                            .unwrap_or_else(PoisonError::into_inner)
                            .recv();
                        match job {
                            Ok(job) => job(),
                            Err(_) => return,
                        }
                    }
                })
                .expect("an Argon2 worker thread starts");
        }
        Mutex::new(sender)
    })
}

fn worker_count() -> usize {
    std::thread::available_parallelism().map_or(1, std::num::NonZero::get)
}

/// Hands `work` to an Argon2 worker at once, and gives a future of its result that waits
/// without blocking the runtime. (Handing it over before the first poll is what lets
/// several shares run side by side.)
///
/// # Panics
/// If the work panics.
fn on_worker<R: Send + 'static>(
    work: impl FnOnce() -> R + Send + 'static,
) -> impl Future<Output = R> {
    let (done, result) = oneshot::channel();
    let job: Job = Box::new(move || {
        let _ = done.send(work());
    });
    workers()
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .send(job)
        .expect("the workers live");
    async move { result.await.expect("an Argon2 job does not panic") }
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

    #[tokio::test]
    async fn many_at_once_keep_their_order() {
        let codes: Vec<Secret> = (0..5).map(|i| Secret::new(format!("code-{i}"))).collect();
        let hashes = hash_many(codes.clone()).await;
        let mut pairs: Vec<(Secret, String)> = codes.into_iter().zip(hashes).collect();
        pairs.push((Secret::new("wrong"), pairs[2].1.clone()));
        assert_eq!(
            verify_many(pairs).await,
            [true, true, true, true, true, false]
        );
    }

    #[test]
    fn generated_codes_have_the_right_shape() {
        let code = generate_authentication_code();
        assert_eq!(code.len(), GENERATED_CODE_LEN);
        assert!(code.bytes().all(|b| CODE_ALPHABET.contains(&b)));
        assert_ne!(code, generate_authentication_code());
    }
}
