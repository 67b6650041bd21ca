//! `#[task]` and `#[flow]`: the attribute macros of Pinazu Flows. They keep the function's
//! body in a hidden function, register a definition (so the runtime can find it by name),
//! and generate a public function with the same parameters that goes through the runtime.
//! Use them through `pinazu_flows` (`use pinazu_flows::prelude::*`).

use proc_macro::TokenStream;
use proc_macro2::{Span, TokenStream as TokenStream2};
use quote::{format_ident, quote};
use syn::spanned::Spanned;
use syn::{
    parse_macro_input, Error, Expr, FnArg, GenericArgument, ItemFn, Lit, LitStr, Pat,
    PathArguments, ReturnType, Type,
};

/// Marks an `async fn` as a task. Its parameters must be owned serde types and it must
/// return `Result<T, E>` (`E: Display + Debug`, e.g. `anyhow::Error`).
///
/// Options: `name = "..."`, `version = "..."`, `retries = N`, `retry_delay = "100ms"`,
/// `backoff = 2.0`, `max_delay = "60s"`, `jitter = 0.1`, `timeout = "30s"`,
/// `cache = "none" | "run" | "inputs"`, `expire = "1h"`, `refresh = true`,
/// `labels = "gpu=true,zone=eu"` (only agents with all these labels run it),
/// `concurrency = 10` (at most 10 attempts running at once, over every agent and run),
/// `rate = "100/s"` (also `/min`, `/h`; with `burst = 5`), `limit = "openai"` (a named
/// limit the coordinator sizes: `--limit openai=20`), `concurrency_key = "tenant"` (an
/// argument, or a field path in one such as `"req.tenant"`: the limits apply per value).
///
/// The generated function returns `Result<T, pinazu_flows::TaskError>` and can only be
/// called within a flow.
#[proc_macro_attribute]
pub fn task(attr: TokenStream, item: TokenStream) -> TokenStream {
    let func = parse_macro_input!(item as ItemFn);
    let mut opts = TaskOpts::default();
    let parser = syn::meta::parser(|meta| opts.parse(meta));
    parse_macro_input!(attr with parser);
    expand_task(opts, func)
        .unwrap_or_else(Error::into_compile_error)
        .into()
}

/// Marks an `async fn` as a flow. Its parameters are the flow's named parameters
/// (`--key=value` on the command line); mark one `#[default(expr)]` to make it optional
/// (an `Option<T>` parameter is optional anyway). It must return `Result<T, E>`.
///
/// Option: `name = "..."`. The generated function runs the flow on the current runtime
/// and returns `Result<T, pinazu_flows::FlowError>`.
#[proc_macro_attribute]
pub fn flow(attr: TokenStream, item: TokenStream) -> TokenStream {
    let func = parse_macro_input!(item as ItemFn);
    let mut name: Option<LitStr> = None;
    let parser = syn::meta::parser(|meta| {
        if meta.path.is_ident("name") {
            name = Some(meta.value()?.parse()?);
            Ok(())
        } else {
            Err(meta.error("unknown #[flow] option; the option is `name = \"...\"`"))
        }
    });
    parse_macro_input!(attr with parser);
    expand_flow(name, func)
        .unwrap_or_else(Error::into_compile_error)
        .into()
}

#[derive(Default)]
struct TaskOpts {
    name: Option<LitStr>,
    version: Option<LitStr>,
    retries: Option<u32>,
    retry_delay: Option<u64>,
    backoff: Option<f64>,
    max_delay: Option<u64>,
    jitter: Option<f64>,
    timeout: Option<u64>,
    cache: Option<String>,
    expire: Option<u64>,
    refresh: Option<bool>,
    labels: Vec<(String, String)>,
    concurrency: Option<u32>,
    rate: Option<LitStr>,
    burst: Option<u32>,
    limit: Option<LitStr>,
    key: Option<LitStr>,
}

impl TaskOpts {
    fn parse(&mut self, meta: syn::meta::ParseNestedMeta) -> syn::Result<()> {
        let key = meta
            .path
            .get_ident()
            .map(|i| i.to_string())
            .unwrap_or_default();
        let lit: Lit = meta.value()?.parse()?;
        let span = lit.span();
        match key.as_str() {
            "name" => self.name = Some(lit_str(&lit)?),
            "version" => self.version = Some(lit_str(&lit)?),
            "retries" => self.retries = Some(lit_int(&lit)?),
            "retry_delay" => self.retry_delay = Some(lit_duration(&lit)?),
            "backoff" => self.backoff = Some(lit_float(&lit)?),
            "max_delay" => self.max_delay = Some(lit_duration(&lit)?),
            "jitter" => {
                let j = lit_float(&lit)?;
                if !(0.0..=1.0).contains(&j) {
                    return Err(Error::new(span, "jitter is a fraction between 0.0 and 1.0"));
                }
                self.jitter = Some(j)
            }
            "timeout" => self.timeout = Some(lit_duration(&lit)?),
            "cache" => {
                let v = lit_str(&lit)?.value();
                if !matches!(v.as_str(), "none" | "run" | "inputs") {
                    return Err(Error::new(span, "cache is one of \"none\", \"run\", \"inputs\""));
                }
                self.cache = Some(v)
            }
            "expire" => self.expire = Some(lit_duration(&lit)?),
            "labels" => {
                for pair in lit_str(&lit)?.value().split(',').filter(|p| !p.trim().is_empty()) {
                    match pair.split_once('=') {
                        Some((k, v)) if !k.trim().is_empty() => {
                            self.labels.push((k.trim().to_string(), v.trim().to_string()))
                        }
                        _ => return Err(Error::new(span, "labels is \"k=v,k2=v2\"")),
                    }
                }
            }
            "concurrency" => {
                let n = lit_int(&lit)?;
                if n == 0 {
                    return Err(Error::new(span, "concurrency = 0 would never run the task; use at least 1"));
                }
                self.concurrency = Some(n)
            }
            "rate" => {
                let r = lit_str(&lit)?;
                if let Err(e) = parse_rate(&r.value()) {
                    return Err(Error::new(span, e));
                }
                self.rate = Some(r)
            }
            "burst" => {
                let n = lit_int(&lit)?;
                if n == 0 {
                    return Err(Error::new(span, "burst is at least 1"));
                }
                self.burst = Some(n)
            }
            "limit" => {
                let l = lit_str(&lit)?;
                let v = l.value();
                if v.is_empty() || !v.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-')) {
                    return Err(Error::new(span, "a limit name uses letters, digits, '_' and '-' only"));
                }
                self.limit = Some(l)
            }
            "concurrency_key" => self.key = Some(lit_str(&lit)?),
            "refresh" => match lit {
                Lit::Bool(b) => self.refresh = Some(b.value),
                _ => return Err(Error::new(span, "refresh is true or false")),
            },
            _ => {
                return Err(meta.error(
                    "unknown #[task] option; options: name, version, retries, retry_delay, backoff, max_delay, jitter, timeout, cache, expire, refresh, labels, concurrency, concurrency_key, rate, burst, limit",
                ))
            }
        }
        Ok(())
    }
}

/// `COUNT/PERIOD` with a count above 0 and a period of s, min or h: (count, period in ms).
fn parse_rate(text: &str) -> Result<(u32, u64), String> {
    let bad = || {
        format!("invalid rate {text:?}: expected COUNT/PERIOD with a count above 0 and a period of s, min or h (e.g. \"100/s\")")
    };
    let (count, per) = text.trim().split_once('/').ok_or_else(bad)?;
    let count: u32 = count.trim().parse().map_err(|_| bad())?;
    let per_ms = match per.trim() {
        "s" | "sec" | "second" => 1_000,
        "m" | "min" | "minute" => 60_000,
        "h" | "hour" => 3_600_000,
        _ => return Err(bad()),
    };
    if count == 0 {
        return Err(bad());
    }
    Ok((count, per_ms))
}

fn lit_str(lit: &Lit) -> syn::Result<LitStr> {
    match lit {
        Lit::Str(s) => Ok(s.clone()),
        _ => Err(Error::new(lit.span(), "expected a string")),
    }
}

fn lit_int(lit: &Lit) -> syn::Result<u32> {
    match lit {
        Lit::Int(i) => i.base10_parse(),
        _ => Err(Error::new(lit.span(), "expected a whole number")),
    }
}

fn lit_float(lit: &Lit) -> syn::Result<f64> {
    match lit {
        Lit::Float(f) => f.base10_parse(),
        Lit::Int(i) => i.base10_parse::<u64>().map(|v| v as f64),
        _ => Err(Error::new(lit.span(), "expected a number")),
    }
}

/// Parses "250ms", "2s", "1m30s", "1h", "1d" (or a bare number of seconds) into nanoseconds.
fn lit_duration(lit: &Lit) -> syn::Result<u64> {
    let text = match lit {
        Lit::Str(s) => s.value(),
        Lit::Int(i) => format!("{}s", i.base10_digits()),
        _ => {
            return Err(Error::new(
                lit.span(),
                "expected a duration such as \"500ms\" or \"2s\"",
            ))
        }
    };
    parse_duration_nanos(&text).ok_or_else(|| {
        Error::new(
            lit.span(),
            format!("invalid duration {text:?}; use e.g. \"500ms\", \"2s\", \"1m30s\", \"1h\""),
        )
    })
}

fn parse_duration_nanos(text: &str) -> Option<u64> {
    let s = text.trim();
    if s.is_empty() {
        return None;
    }
    let mut total: f64 = 0.0;
    let mut rest = s;
    while !rest.is_empty() {
        let num_end = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        let (num, tail) = rest.split_at(num_end);
        let value: f64 = num.parse().ok()?;
        let unit_end = tail
            .find(|c: char| c.is_ascii_digit())
            .unwrap_or(tail.len());
        let (unit, tail) = tail.split_at(unit_end);
        let scale = match unit.trim() {
            "ns" => 1.0,
            "us" | "µs" => 1e3,
            "ms" => 1e6,
            "" | "s" => 1e9,
            "m" | "min" => 60e9,
            "h" => 3600e9,
            "d" => 86400e9,
            _ => return None,
        };
        total += value * scale;
        rest = tail;
    }
    Some(total as u64)
}

struct Param {
    /// Name used in the generated public function.
    ident: syn::Ident,
    pat: Box<Pat>,
    ty: Box<Type>,
    default: Option<Expr>,
}

fn params(func: &mut ItemFn, kind: &str) -> syn::Result<Vec<Param>> {
    let mut out = Vec::new();
    for (i, arg) in func.sig.inputs.iter_mut().enumerate() {
        let FnArg::Typed(pt) = arg else {
            return Err(Error::new(
                arg.span(),
                format!("a {kind} is a free function; it cannot take self"),
            ));
        };
        if let Type::Reference(r) = &*pt.ty {
            return Err(Error::new(
                r.span(),
                format!("{kind} parameters are sent between processes, so they must be owned (e.g. String, not &str)"),
            ));
        }
        let mut default = None;
        let mut err = None;
        pt.attrs.retain(|a| {
            if a.path().is_ident("default") {
                match a.parse_args::<Expr>() {
                    Ok(e) => default = Some(e),
                    Err(e) => err = Some(e),
                }
                false
            } else {
                true
            }
        });
        if let Some(e) = err {
            return Err(e);
        }
        let ident = match &*pt.pat {
            Pat::Ident(pi) => pi.ident.clone(),
            _ => format_ident!("__pinazu_arg{}", i),
        };
        out.push(Param {
            ident,
            pat: pt.pat.clone(),
            ty: pt.ty.clone(),
            default,
        });
    }
    Ok(out)
}

/// `T` of a `Result<T, E>` / `anyhow::Result<T>` return type.
fn ok_type(sig: &syn::Signature, kind: &str) -> syn::Result<Type> {
    let err = || {
        Error::new(
            sig.output.span(),
            format!(
                "a {kind} must return Result<T, E> (E: Display + Debug, e.g. anyhow::Result<T>)"
            ),
        )
    };
    let ReturnType::Type(_, ty) = &sig.output else {
        return Err(err());
    };
    let Type::Path(tp) = &**ty else {
        return Err(err());
    };
    let last = tp.path.segments.last().ok_or_else(err)?;
    if !last.ident.to_string().ends_with("Result") {
        return Err(err());
    }
    let PathArguments::AngleBracketed(args) = &last.arguments else {
        return Err(err());
    };
    match args.args.first() {
        Some(GenericArgument::Type(t)) => Ok(t.clone()),
        _ => Err(err()),
    }
}

fn check_signature(func: &ItemFn, kind: &str) -> syn::Result<()> {
    if func.sig.asyncness.is_none() {
        return Err(Error::new(
            func.sig.fn_token.span(),
            format!("a {kind} must be an `async fn`"),
        ));
    }
    if !func.sig.generics.params.is_empty() {
        return Err(Error::new(
            func.sig.generics.span(),
            format!("a {kind} cannot be generic: it is registered by name"),
        ));
    }
    Ok(())
}

/// The original function, renamed and hidden: the body the generated code calls.
fn hidden_body(func: &ItemFn, ident: &syn::Ident) -> ItemFn {
    let mut body = func.clone();
    body.sig.ident = ident.clone();
    body.vis = syn::Visibility::Inherited;
    body.attrs.retain(|a| !a.path().is_ident("doc"));
    body
}

/// The first line of a function's doc comment (for `--help` and `--list`).
fn first_doc_line(func: &ItemFn) -> LitStr {
    let line = func
        .attrs
        .iter()
        .filter(|a| a.path().is_ident("doc"))
        .find_map(|a| match &a.meta {
            syn::Meta::NameValue(nv) => match &nv.value {
                Expr::Lit(syn::ExprLit {
                    lit: Lit::Str(s), ..
                }) => Some(s.value().trim().to_string()),
                _ => None,
            },
            _ => None,
        })
        .unwrap_or_default();
    LitStr::new(&line, Span::call_site())
}

/// Where a definition was written, for duplicate-name errors.
fn source_tokens() -> TokenStream2 {
    quote!(::pinazu_flows::__private::Source {
        module: ::core::module_path!(),
        file: ::core::file!(),
        line: ::core::line!(),
        package: ::core::env!("CARGO_PKG_NAME"),
        version: ::core::env!("CARGO_PKG_VERSION"),
    })
}

fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))
}

fn expand_task(opts: TaskOpts, mut func: ItemFn) -> syn::Result<TokenStream2> {
    check_signature(&func, "task")?;
    let ok_ty = ok_type(&func.sig, "task")?;
    let params = params(&mut func, "task")?;
    if let Some(p) = params.iter().find(|p| p.default.is_some()) {
        return Err(Error::new(
            p.ident.span(),
            "#[default] is for flow parameters; task calls pass every argument",
        ));
    }
    let fn_ident = func.sig.ident.clone();
    let name = opts
        .name
        .clone()
        .unwrap_or_else(|| LitStr::new(&fn_ident.to_string(), fn_ident.span()));
    if !valid_name(&name.value()) {
        return Err(Error::new(
            name.span(),
            "a task name uses letters, digits, '_', '-' and '.' only",
        ));
    }
    let version = opts
        .version
        .clone()
        .unwrap_or_else(|| LitStr::new("", Span::call_site()));
    let def_ident = format_ident!("__PINAZU_TASK_{}", fn_ident);
    let invoke_ident = format_ident!("__pinazu_invoke_{}", fn_ident);
    let body_ident = format_ident!("__pinazu_body_{}", fn_ident);

    let retries = opts.retries.unwrap_or(0);
    let dur = |v: Option<u64>, d: TokenStream2| match v {
        Some(n) => quote!(::core::time::Duration::from_nanos(#n)),
        None => d,
    };
    let retry_delay = dur(
        opts.retry_delay,
        quote!(::pinazu_flows::__private::RetryPolicy::DEFAULT.delay),
    );
    let max_delay = dur(
        opts.max_delay,
        quote!(::pinazu_flows::__private::RetryPolicy::DEFAULT.max_delay),
    );
    let backoff = match opts.backoff {
        Some(b) => quote!(#b),
        None => quote!(::pinazu_flows::__private::RetryPolicy::DEFAULT.backoff),
    };
    let jitter = match opts.jitter {
        Some(j) => quote!(#j),
        None => quote!(::pinazu_flows::__private::RetryPolicy::DEFAULT.jitter),
    };
    let opt_dur = |v: Option<u64>| match v {
        Some(n) => quote!(::core::option::Option::Some(::core::time::Duration::from_nanos(#n))),
        None => quote!(::core::option::Option::None),
    };
    let timeout = opt_dur(opts.timeout);
    let expire = opt_dur(opts.expire);
    let cache = match opts.cache.as_deref() {
        Some("run") => quote!(::pinazu_flows::__private::CachePolicy::Run),
        Some("inputs") => quote!(::pinazu_flows::__private::CachePolicy::Inputs),
        _ => quote!(::pinazu_flows::__private::CachePolicy::None),
    };
    let refresh = opts.refresh.unwrap_or(false);
    if opts.burst.is_some() && opts.rate.is_none() {
        return Err(Error::new(
            Span::call_site(),
            "burst needs a rate (e.g. rate = \"100/s\", burst = 10)",
        ));
    }
    if let Some(k) = &opts.key {
        if opts.concurrency.is_none() && opts.rate.is_none() {
            return Err(Error::new(
                k.span(),
                "concurrency_key splits the task's own concurrency or rate: add concurrency or rate (a named limit is shared by every key, not split)",
            ));
        }
    }
    let concurrency = match opts.concurrency {
        Some(n) => quote!(::core::option::Option::Some(#n)),
        None => quote!(::core::option::Option::None),
    };
    let rate = match &opts.rate {
        Some(r) => {
            let (count, per_ms) = parse_rate(&r.value()).map_err(|e| Error::new(r.span(), e))?;
            let burst = opts.burst.unwrap_or(1);
            quote!(::core::option::Option::Some(::pinazu_flows::__private::RateSpec { count: #count, per_ms: #per_ms, burst: #burst }))
        }
        None => quote!(::core::option::Option::None),
    };
    let limit = match &opts.limit {
        Some(l) => quote!(::core::option::Option::Some(#l)),
        None => quote!(::core::option::Option::None),
    };
    // the key: an argument, or a field path in one, read before the arguments move
    let (key_opt, key_expr) = match &opts.key {
        Some(k) => {
            let text = k.value();
            let mut parts = text.split('.').map(str::trim);
            let first = parts.next().unwrap_or_default();
            let Some(p) = params.iter().find(|p| p.ident == first) else {
                let names: Vec<String> = params.iter().map(|p| p.ident.to_string()).collect();
                return Err(Error::new(
                    k.span(),
                    format!("concurrency_key {text:?}: `{first}` is not an argument of this task (its arguments: {})", names.join(", ")),
                ));
            };
            let arg = &p.ident;
            let mut fields = Vec::new();
            for f in parts {
                if f.is_empty() || !f.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
                    return Err(Error::new(k.span(), format!("concurrency_key {text:?}: expected an argument or a field path such as \"req.tenant\"")));
                }
                fields.push(match f.parse::<u32>() {
                    Ok(n) => {
                        let i = syn::Index {
                            index: n,
                            span: k.span(),
                        };
                        quote!(#i)
                    }
                    Err(_) => {
                        let id = syn::Ident::new(f, k.span());
                        quote!(#id)
                    }
                });
            }
            (
                quote!(::core::option::Option::Some(#k)),
                quote!(::core::option::Option::Some(::pinazu_flows::__private::limit_key(&#arg #(.#fields)*))),
            )
        }
        None => (
            quote!(::core::option::Option::None),
            quote!(::core::option::Option::None),
        ),
    };
    let label_keys: Vec<&String> = opts.labels.iter().map(|(k, _)| k).collect();
    let label_values: Vec<&String> = opts.labels.iter().map(|(_, v)| v).collect();

    let vis = &func.vis;
    let attrs: Vec<_> = func
        .attrs
        .iter()
        .filter(|a| a.path().is_ident("doc"))
        .collect();
    let idents: Vec<_> = params.iter().map(|p| &p.ident).collect();
    let pats: Vec<_> = params.iter().map(|p| &p.pat).collect();
    let tys: Vec<_> = params.iter().map(|p| &p.ty).collect();
    let arg_names: Vec<_> = (0..params.len())
        .map(|i| format_ident!("__a{}", i))
        .collect();

    let body_fn = hidden_body(&func, &body_ident);
    let source = source_tokens();

    let _ = pats;
    Ok(quote! {
        #(#attrs)*
        #[doc = ""]
        #[doc = concat!("Task `", #name, "`: runs on an agent; can only be called within a flow.")]
        #vis async fn #fn_ident(#(#idents: #tys),*) -> ::core::result::Result<#ok_ty, ::pinazu_flows::TaskError> {
            let __pinazu_key: ::core::option::Option<::std::string::String> = #key_expr;
            ::pinazu_flows::__private::call_task_keyed::<#ok_ty, _>(&#def_ident, (#(#idents,)*), __pinazu_key).await
        }

        #[doc(hidden)]
        #[allow(non_upper_case_globals)]
        static #def_ident: ::pinazu_flows::__private::TaskDef = ::pinazu_flows::__private::TaskDef {
            name: #name,
            version: #version,
            options: ::pinazu_flows::__private::TaskOptions {
                retry: ::pinazu_flows::__private::RetryPolicy {
                    retries: #retries,
                    delay: #retry_delay,
                    backoff: #backoff,
                    max_delay: #max_delay,
                    jitter: #jitter,
                },
                timeout: #timeout,
                cache: #cache,
                expire: #expire,
                refresh: #refresh,
                labels: &[#((#label_keys, #label_values)),*],
                limits: ::pinazu_flows::__private::TaskLimits {
                    concurrency: #concurrency,
                    rate: #rate,
                    limit: #limit,
                    key: #key_opt,
                },
            },
            invoke: #invoke_ident,
            check: ::pinazu_flows::__private::check_result::<#ok_ty>,
            source: #source,
        };

        ::pinazu_flows::__private::inventory::submit! {
            ::pinazu_flows::__private::TaskEntry(&#def_ident)
        }

        #[doc(hidden)]
        fn #invoke_ident(
            args: ::pinazu_flows::__private::Bytes,
            want_key: bool,
        ) -> ::pinazu_flows::__private::BoxFuture<'static, ::pinazu_flows::__private::Invoked> {
            ::std::boxed::Box::pin(async move {
                let (#(#arg_names,)*): (#(#tys,)*) = match ::pinazu_flows::__private::decode_args(#name, &args) {
                    ::core::result::Result::Ok(a) => a,
                    ::core::result::Result::Err(e) => {
                        return ::pinazu_flows::__private::Invoked {
                            outcome: ::core::result::Result::Err(e),
                            cache_key: ::core::option::Option::None,
                        }
                    }
                };
                let cache_key = if want_key {
                    ::pinazu_flows::__private::args_md5(#name, &(#(&#arg_names,)*))
                } else {
                    ::core::option::Option::None
                };
                let outcome = match #body_ident(#(#arg_names),*).await {
                    ::core::result::Result::Ok(v) => ::pinazu_flows::__private::encode_ok(#name, &v),
                    ::core::result::Result::Err(e) => {
                        #[allow(unused_imports)]
                        use ::pinazu_flows::__private::{KeepNothing as _, KeepSerializable as _};
                        let payload = (&&::pinazu_flows::__private::ErrorValue(&e)).payload();
                        ::core::result::Result::Err(
                            ::pinazu_flows::__private::ErrorInfo::from_user_error(
                                ::pinazu_flows::__private::FailureKind::Error,
                                &e,
                            )
                            .with_payload(payload),
                        )
                    }
                };
                ::pinazu_flows::__private::Invoked { outcome, cache_key }
            })
        }

        #[doc(hidden)]
        #body_fn
    })
}

fn expand_flow(name: Option<LitStr>, mut func: ItemFn) -> syn::Result<TokenStream2> {
    check_signature(&func, "flow")?;
    let ok_ty = ok_type(&func.sig, "flow")?;
    let params = params(&mut func, "flow")?;
    let fn_ident = func.sig.ident.clone();
    let name = name.unwrap_or_else(|| LitStr::new(&fn_ident.to_string(), fn_ident.span()));
    if !valid_name(&name.value()) {
        return Err(Error::new(
            name.span(),
            "a flow name uses letters, digits, '_', '-' and '.' only",
        ));
    }
    let def_ident = format_ident!("__PINAZU_FLOW_{}", fn_ident);
    let params_ident = format_ident!("__PINAZU_FLOW_PARAMS_{}", fn_ident);
    let invoke_ident = format_ident!("__pinazu_flow_invoke_{}", fn_ident);
    let body_ident = format_ident!("__pinazu_flow_body_{}", fn_ident);
    let vis = &func.vis;
    let attrs: Vec<_> = func
        .attrs
        .iter()
        .filter(|a| a.path().is_ident("doc"))
        .collect();
    let idents: Vec<_> = params.iter().map(|p| &p.ident).collect();
    let tys: Vec<_> = params.iter().map(|p| &p.ty).collect();
    let names: Vec<_> = params
        .iter()
        .map(|p| LitStr::new(p.ident.to_string().trim_start_matches("r#"), p.ident.span()))
        .collect();
    let type_texts: Vec<LitStr> = params
        .iter()
        .map(|p| {
            let ty = &p.ty;
            LitStr::new(&quote!(#ty).to_string(), Span::call_site())
        })
        .collect();
    let default_texts: Vec<TokenStream2> = params
        .iter()
        .map(|p| match &p.default {
            Some(e) => {
                let text = LitStr::new(&quote!(#e).to_string(), Span::call_site());
                quote!(::core::option::Option::Some(#text))
            }
            None => quote!(::core::option::Option::None),
        })
        .collect();
    let doc = first_doc_line(&func);
    let takes = params.iter().zip(&names).map(|(p, n)| {
        let ident = &p.ident;
        let ty = &p.ty;
        let default = match &p.default {
            Some(e) => quote!(::core::option::Option::Some((|| -> #ty { #e }) as fn() -> #ty)),
            None => quote!(::core::option::Option::None),
        };
        quote!(let #ident: #ty = __params.take(#n, #default)?;)
    });
    let defaults: Vec<TokenStream2> = params
        .iter()
        .map(|p| {
            let ty = &p.ty;
            match &p.default {
                Some(e) => {
                    quote!(::core::option::Option::Some((|| -> #ty { #e }) as fn() -> #ty))
                }
                None => quote!(::core::option::Option::None),
            }
        })
        .collect();
    let text_ident = format_ident!("__pinazu_flow_text_{}", fn_ident);
    let same_ident = format_ident!("__pinazu_flow_same_{}", fn_ident);

    let body_fn = hidden_body(&func, &body_ident);
    let source = source_tokens();

    Ok(quote! {
        #(#attrs)*
        #[doc = ""]
        #[doc = concat!("Flow `", #name, "`: calling it runs the flow on the current runtime (embedded by default).")]
        #vis async fn #fn_ident(#(#idents: #tys),*) -> ::core::result::Result<#ok_ty, ::pinazu_flows::FlowError> {
            let mut __params = ::pinazu_flows::__private::Map::new();
            #(
                __params.insert(
                    ::std::string::String::from(#names),
                    ::pinazu_flows::__private::param_value(#name, #names, &#idents)?,
                );
            )*
            ::pinazu_flows::__private::run_flow::<#ok_ty>(&#def_ident, __params).await
        }

        #[doc(hidden)]
        #[allow(non_upper_case_globals)]
        static #def_ident: ::pinazu_flows::__private::FlowDef = ::pinazu_flows::__private::FlowDef {
            name: #name,
            params: #params_ident,
            doc: #doc,
            invoke: #invoke_ident,
            parse_text: #text_ident,
            same_params: #same_ident,
            source: #source,
        };

        #[doc(hidden)]
        fn #text_ident(
            name: &str,
            raw: &str,
        ) -> ::core::option::Option<::core::result::Result<::pinazu_flows::__private::Value, ::pinazu_flows::__private::ParamError>> {
            match name {
                #(
                    #names => ::core::option::Option::Some(
                        ::pinazu_flows::__private::param_from_text::<#tys>(#name, #names, raw)
                    ),
                )*
                _ => ::core::option::Option::None,
            }
        }

        #[doc(hidden)]
        #[allow(unused_mut, unused_variables)]
        fn #same_ident(
            a: &::pinazu_flows::__private::Map<::std::string::String, ::pinazu_flows::__private::Value>,
            b: &::pinazu_flows::__private::Map<::std::string::String, ::pinazu_flows::__private::Value>,
        ) -> bool {
            let (::core::result::Result::Ok(mut __a), ::core::result::Result::Ok(mut __b)) = (
                ::pinazu_flows::__private::Params::new(#name, #params_ident, a.clone()),
                ::pinazu_flows::__private::Params::new(#name, #params_ident, b.clone()),
            ) else {
                return a == b;
            };
            #(
                {
                    let x: ::core::result::Result<#tys, _> = __a.take(#names, #defaults);
                    let y: ::core::result::Result<#tys, _> = __b.take(#names, #defaults);
                    match (x, y) {
                        (::core::result::Result::Ok(x), ::core::result::Result::Ok(y)) => {
                            #[allow(unused_imports)]
                            use ::pinazu_flows::__private::{SameByEq as _, SameByJson as _};
                            if !(&&::pinazu_flows::__private::Same(&x, &y)).same() {
                                return false;
                            }
                        }
                        _ => return a == b,
                    }
                }
            )*
            true
        }

        #[doc(hidden)]
        #[allow(non_upper_case_globals)]
        static #params_ident: &[::pinazu_flows::__private::ParamDef] = &[#(
            ::pinazu_flows::__private::ParamDef { name: #names, ty: #type_texts, default: #default_texts }
        ),*];

        ::pinazu_flows::__private::inventory::submit! {
            ::pinazu_flows::__private::FlowEntry(&#def_ident)
        }

        #[doc(hidden)]
        fn #invoke_ident(
            params: ::pinazu_flows::__private::Map<::std::string::String, ::pinazu_flows::__private::Value>,
        ) -> ::core::result::Result<
            ::pinazu_flows::__private::FlowStart,
            ::pinazu_flows::__private::ParamError,
        > {
            let mut __params = ::pinazu_flows::__private::Params::new(#name, #params_ident, params)?;
            #(#takes)*
            ::core::result::Result::Ok(::pinazu_flows::__private::FlowStart {
                params: __params.taken(),
                body: ::std::boxed::Box::pin(async move {
                    ::pinazu_flows::__private::encode_flow_result(#name, #body_ident(#(#idents),*).await)
                }),
            })
        }

        #[doc(hidden)]
        #body_fn
    })
}

#[cfg(test)]
mod tests {
    use super::parse_duration_nanos as p;

    #[test]
    fn durations() {
        assert_eq!(p("500ms"), Some(500_000_000));
        assert_eq!(p("2s"), Some(2_000_000_000));
        assert_eq!(p("1m30s"), Some(90_000_000_000));
        assert_eq!(p("1h"), Some(3_600_000_000_000));
        assert_eq!(p("1.5s"), Some(1_500_000_000));
        assert_eq!(p("3"), Some(3_000_000_000));
        assert_eq!(p("abc"), None);
        assert_eq!(p(""), None);
    }
}
