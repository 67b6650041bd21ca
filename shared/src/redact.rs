//! Secrets stay secret: credentials in URLs (`nats://user:pass@host`,
//! `nats://TOKEN@host`) and the values of secret settings (passwords, tokens, AWS
//! secret keys) are replaced by `***` in every log line, error and status message.

use std::borrow::Cow;
use std::sync::RwLock;

static SECRETS: RwLock<Vec<String>> = RwLock::new(Vec::new());

/// Environment variables whose values are secrets.
pub const SECRET_VARS: &[&str] = &[
    "NATS_PASSWORD",
    "NATS_TOKEN",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
];

/// Remembers a secret value, so that it is redacted wherever it shows up. Values shorter
/// than 4 characters are not (they would redact ordinary text).
pub fn register(secret: &str) {
    let secret = secret.trim();
    if secret.len() < 4 {
        return;
    }
    // as it appears inside JSON (an event's error_message) too
    let escaped = serde_json::to_string(secret).unwrap_or_default();
    let escaped = escaped.trim_matches('"');
    if escaped != secret {
        register_one(escaped);
    }
    register_one(secret);
}

fn register_one(secret: &str) {
    if let Ok(mut s) = SECRETS.write() {
        if !s.iter().any(|x| x == secret) {
            s.push(secret.to_string());
            // longest first, so a secret containing another is replaced whole
            s.sort_by_key(|x| std::cmp::Reverse(x.len()));
        }
    }
}

/// Registers the secrets of the environment ([`SECRET_VARS`], and those in `NATS_URL`).
pub fn register_env() {
    for var in SECRET_VARS {
        if let Ok(v) = std::env::var(var) {
            register(&v);
        }
    }
    if let Ok(urls) = std::env::var("NATS_URL") {
        register_url(&urls);
    }
}

/// Registers the passwords and tokens in a comma-separated list of URLs, decoded and
/// as written.
pub fn register_url(urls: &str) {
    for url in urls.split(',') {
        if let Some((_, secret)) = url_credentials(url) {
            register(&secret);
        }
        if let Some((_, rest)) = url.trim().split_once("://") {
            if let Some((userinfo, _)) = rest.rsplit_once('@') {
                register(userinfo.split_once(':').map_or(userinfo, |(_, p)| p));
            }
        }
    }
}

/// The user (if any) and the password or token in a URL's user info:
/// `scheme://user:pass@host` -> `(Some(user), pass)`; `scheme://token@host` ->
/// `(None, token)`.
/// NATS addresses have no path, so the user info ends at the last `@` (a password may
/// hold `/` or `@` unencoded); percent-encoded user info (`%40`) is decoded.
pub fn url_credentials(url: &str) -> Option<(Option<String>, String)> {
    let (_, rest) = split_scheme(url.trim());
    let rest = rest.split(['?', '#']).next().unwrap_or(rest);
    let (userinfo, _) = rest.rsplit_once('@')?;
    if userinfo.is_empty() {
        return None;
    }
    Some(match userinfo.split_once(':') {
        Some((user, pass)) => (Some(percent_decode(user)), percent_decode(pass)),
        None => (None, percent_decode(userinfo)),
    })
}

/// A server address split into its scheme (if it has one) and the rest. Lenient, as
/// people type them: `nats://h`, `nats:/h` (one slash), or no scheme at all
/// (`user:pass@h:4222`).
pub fn split_scheme(url: &str) -> (Option<&str>, &str) {
    if let Some((scheme, rest)) = url.split_once("://") {
        return (Some(scheme), rest);
    }
    if let Some((scheme, rest)) = url.split_once(":/") {
        if !scheme.is_empty() && scheme.chars().all(|c| c.is_ascii_alphabetic()) {
            return (Some(scheme), rest.trim_start_matches('/'));
        }
    }
    (None, url)
}

/// `%XX` sequences decoded (invalid ones kept as they are).
fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            let hex = std::str::from_utf8(&b[i + 1..i + 3]).unwrap_or("");
            if let Ok(v) = u8::from_str_radix(hex, 16) {
                out.push(v);
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8(out).unwrap_or_else(|_| s.to_string())
}

/// `text` with URL credentials and registered secrets replaced by `***`.
pub fn redact(text: &str) -> Cow<'_, str> {
    let mut out = Cow::Borrowed(text);
    if text.contains("://") {
        out = Cow::Owned(redact_urls(text));
    }
    if let Ok(secrets) = SECRETS.read() {
        for s in secrets.iter() {
            if out.contains(s.as_str()) {
                out = Cow::Owned(out.replace(s.as_str(), "***"));
            }
        }
    }
    out
}

/// Replaces the password (or token) of every `scheme://userinfo@host` in `text`.
fn redact_urls(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(i) = rest.find("://") {
        let (head, tail) = rest.split_at(i + 3);
        out.push_str(head);
        // the authority ends at the first of these
        let end = tail
            .find(|c: char| {
                c == '/' || c == '?' || c == '#' || c.is_whitespace() || "\"'<>,;)]}".contains(c)
            })
            .unwrap_or(tail.len());
        let authority = &tail[..end];
        match authority.rsplit_once('@') {
            Some((userinfo, host)) if !userinfo.is_empty() => {
                match userinfo.split_once(':') {
                    Some((user, _)) => {
                        out.push_str(user);
                        out.push_str(":***@");
                    }
                    None => out.push_str("***@"),
                }
                out.push_str(host);
            }
            _ => out.push_str(authority),
        }
        rest = &tail[end..];
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_in_urls_and_registered_secrets_are_redacted() {
        assert_eq!(
            redact("could not connect to nats://alice:s3cret@host:4222, nats://tok3n@h2"),
            "could not connect to nats://alice:***@host:4222, nats://***@h2"
        );
        assert_eq!(
            redact("plain http://host/path text"),
            "plain http://host/path text"
        );
        assert_eq!(
            url_credentials("nats://u:p@h:1"),
            Some((Some("u".into()), "p".into()))
        );
        assert_eq!(url_credentials("nats://t@h"), Some((None, "t".into())));
        assert_eq!(url_credentials("nats://h:1"), None);
        assert_eq!(
            url_credentials("nats://u:p/a@ss@h:1"),
            Some((Some("u".into()), "p/a@ss".into()))
        );
        assert_eq!(
            url_credentials("nats://u:p%40ss@h:1"),
            Some((Some("u".into()), "p@ss".into()))
        );
        // as people type them: no scheme, or one slash
        assert_eq!(
            url_credentials("pinazu:S3cr%40t@127.0.0.1:4222"),
            Some((Some("pinazu".into()), "S3cr@t".into()))
        );
        assert_eq!(
            url_credentials("nats:/u:pw@h"),
            Some((Some("u".into()), "pw".into()))
        );
        assert_eq!(url_credentials("127.0.0.1:4222"), None);
        register("wJalrXUtnFEMI/K7MDENG");
        assert_eq!(
            redact("signature with wJalrXUtnFEMI/K7MDENG failed"),
            "signature with *** failed"
        );
    }
}
