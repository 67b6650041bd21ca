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
        for url in urls.split(',') {
            if let Some((_, secret)) = url_credentials(url) {
                register(&secret);
            }
        }
    }
}

/// The user (if any) and the password or token in a URL's user info:
/// `scheme://user:pass@host` -> `(Some(user), pass)`; `scheme://token@host` ->
/// `(None, token)`.
pub fn url_credentials(url: &str) -> Option<(Option<String>, String)> {
    let (_, rest) = url.trim().split_once("://")?;
    let authority = rest.split(['/', '?', '#']).next().unwrap_or(rest);
    let (userinfo, _) = authority.rsplit_once('@')?;
    if userinfo.is_empty() {
        return None;
    }
    Some(match userinfo.split_once(':') {
        Some((user, pass)) => (Some(user.to_string()), pass.to_string()),
        None => (None, userinfo.to_string()),
    })
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
        register("wJalrXUtnFEMI/K7MDENG");
        assert_eq!(
            redact("signature with wJalrXUtnFEMI/K7MDENG failed"),
            "signature with *** failed"
        );
    }
}
