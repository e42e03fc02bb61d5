//! A small SQL lexer for the cluster transformation: enough to find keywords, names and
//! balanced parentheses outside strings.

use anyhow::{bail, Context as _, Result};

use super::is_plain_ident;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Kind {
    Word,
    /// `...` or "..." (a quoted identifier).
    QIdent,
    /// '...'
    Str,
    Space,
    Punct,
}

#[derive(Debug, Clone, Copy)]
pub(super) struct Tok<'a> {
    pub(super) kind: Kind,
    pub(super) text: &'a str,
}

impl Tok<'_> {
    pub(super) fn is_kw(&self, kw: &str) -> bool {
        self.kind == Kind::Word && self.text.eq_ignore_ascii_case(kw)
    }
    pub(super) fn is(&self, p: &str) -> bool {
        self.kind == Kind::Punct && self.text == p
    }
    /// The name it denotes, if a word or a quoted identifier.
    pub(super) fn name(&self) -> Option<String> {
        match self.kind {
            Kind::Word => Some(self.text.to_string()),
            Kind::QIdent => Some(self.text[1..self.text.len() - 1].to_string()),
            _ => None,
        }
    }
}

pub(super) fn lex(sql: &str) -> Vec<Tok<'_>> {
    let b = sql.as_bytes();
    let mut toks = Vec::new();
    let mut i = 0;
    while i < b.len() {
        let c = b[i];
        let start = i;
        let kind = if c.is_ascii_whitespace() {
            while i < b.len() && b[i].is_ascii_whitespace() {
                i += 1;
            }
            Kind::Space
        } else if c.is_ascii_alphanumeric() || c == b'_' || c >= 0x80 {
            while i < b.len() && (b[i].is_ascii_alphanumeric() || b[i] == b'_' || b[i] >= 0x80) {
                i += 1;
            }
            Kind::Word
        } else if c == b'\'' || c == b'"' || c == b'`' {
            i += 1;
            while i < b.len() {
                if b[i] == b'\\' {
                    i += 2;
                    continue;
                }
                if b[i] == c {
                    if b.get(i + 1) == Some(&c) {
                        i += 2;
                        continue;
                    }
                    i += 1;
                    break;
                }
                i += 1;
            }
            i = i.min(b.len());
            if c == b'\'' {
                Kind::Str
            } else {
                Kind::QIdent
            }
        } else {
            // One (possibly multi-byte) character.
            i += sql[i..].chars().next().map_or(1, char::len_utf8);
            Kind::Punct
        };
        toks.push(Tok { kind, text: &sql[start..i] });
    }
    toks
}

/// Indices of the non-space tokens.
pub(super) fn significant(toks: &[Tok<'_>]) -> Vec<usize> {
    toks.iter().enumerate().filter(|(_, t)| t.kind != Kind::Space).map(|(i, _)| i).collect()
}

/// The index of the `)` closing the `(` at `open`.
pub(super) fn matching_paren(toks: &[Tok<'_>], open: usize) -> Result<usize> {
    let mut depth = 0usize;
    for (i, t) in toks.iter().enumerate().skip(open) {
        if t.is("(") {
            depth += 1;
        } else if t.is(")") {
            depth -= 1;
            if depth == 0 {
                return Ok(i);
            }
        }
    }
    bail!("unbalanced parentheses")
}

pub(super) fn concat(toks: &[Tok<'_>]) -> String {
    toks.iter().map(|t| t.text).collect()
}

/// A cursor over the significant tokens.
pub(super) struct Cursor<'t, 'a> {
    toks: &'t [Tok<'a>],
    sig: Vec<usize>,
    pos: usize,
}

impl<'t, 'a> Cursor<'t, 'a> {
    pub(super) fn new(toks: &'t [Tok<'a>]) -> Self {
        Self { sig: significant(toks), toks, pos: 0 }
    }
    pub(super) fn peek(&self) -> Option<Tok<'a>> {
        self.sig.get(self.pos).map(|&i| self.toks[i])
    }
    pub(super) fn peek_at(&self, ahead: usize) -> Option<Tok<'a>> {
        self.sig.get(self.pos + ahead).map(|&i| self.toks[i])
    }
    /// Index into `toks` of the current significant token (or the end).
    pub(super) fn index(&self) -> usize {
        self.sig.get(self.pos).copied().unwrap_or(self.toks.len())
    }
    pub(super) fn bump(&mut self) -> Option<Tok<'a>> {
        let t = self.peek();
        self.pos += 1;
        t
    }
    pub(super) fn eat_kw(&mut self, kw: &str) -> bool {
        if self.peek().is_some_and(|t| t.is_kw(kw)) {
            self.pos += 1;
            true
        } else {
            false
        }
    }
    pub(super) fn eat_kws(&mut self, kws: &[&str]) -> bool {
        if kws.iter().enumerate().all(|(k, kw)| self.peek_at(k).is_some_and(|t| t.is_kw(kw))) {
            self.pos += kws.len();
            true
        } else {
            false
        }
    }
    pub(super) fn expect_kw(&mut self, kw: &str) -> Result<()> {
        if self.eat_kw(kw) {
            Ok(())
        } else {
            bail!("expected {kw}, found {:?}", self.peek().map(|t| t.text))
        }
    }
    /// A table or view name; a database-qualified name is refused (migrations run in the
    /// database they are applied to).
    pub(super) fn name(&mut self) -> Result<String> {
        let t = self.bump().context("expected a name, found the end")?;
        let name = t.name().with_context(|| format!("expected a name, found {:?}", t.text))?;
        if self.peek().is_some_and(|t| t.is(".")) {
            bail!("{name}.{}: migrations must not name a database", self.peek_at(1).map_or("", |t| t.text));
        }
        if !is_plain_ident(&name) {
            bail!("name {name:?}: only ASCII letters, digits and underscores are supported in cluster mode");
        }
        Ok(name)
    }
    /// Moves to the significant token at or after `toks` index `i`.
    pub(super) fn seek(&mut self, i: usize) {
        self.pos = self.sig.iter().position(|&s| s >= i).unwrap_or(self.sig.len());
    }
}
