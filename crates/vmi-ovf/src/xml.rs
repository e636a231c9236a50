//! A small namespace-aware XML tree, enough to read OVF descriptors and libvirt domains, keep the
//! parts vmi does not model, and write everything back (XML 1.0 + Namespaces in XML 1.0).
//!
//! Input is untrusted: the document size, nesting depth and element count are capped before
//! anything grows without bound.

use crate::error::{OvfError, Result};
use quick_xml::events::{BytesStart, Event};
use quick_xml::Reader;
use std::collections::BTreeMap;
use std::fmt::Write as _;

/// Largest descriptor or config vmi reads (vSphere rejects descriptors far below this).
pub const MAX_DOCUMENT_BYTES: usize = 64 * 1024 * 1024;
/// Deepest element nesting accepted; OVF needs about 8 levels.
pub const MAX_DEPTH: usize = 128;
/// Most elements in one document.
pub const MAX_ELEMENTS: usize = 1_000_000;

/// The `xml:` prefix's namespace, bound by definition.
const XML_NS: &str = "http://www.w3.org/XML/1998/namespace";

/// A namespace-resolved name: namespace URI (empty for none) and local part.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Name {
    /// Namespace URI, or empty.
    pub ns: String,
    /// Local part.
    pub local: String,
}

impl Name {
    /// A name in namespace `ns`.
    pub fn new(ns: &str, local: &str) -> Self {
        Name {
            ns: ns.to_string(),
            local: local.to_string(),
        }
    }
}

/// One attribute.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attr {
    /// Resolved name (unprefixed attributes have no namespace).
    pub name: Name,
    /// Prefix as written, kept as a hint when writing back.
    pub prefix: String,
    /// Unescaped value.
    pub value: String,
}

/// A child node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Node {
    /// An element.
    Element(Element),
    /// Character data (unescaped).
    Text(String),
}

/// An element with its attributes and children.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Element {
    /// Resolved name.
    pub name: Name,
    /// Prefix as written, a hint when writing back.
    pub prefix: String,
    /// Attributes in document order (namespace declarations excluded).
    pub attrs: Vec<Attr>,
    /// Children in document order.
    pub children: Vec<Node>,
    /// Namespace declarations written on this element (prefix → URI), as hints for prefixes.
    pub decls: Vec<(String, String)>,
}

impl Default for Name {
    fn default() -> Self {
        Name::new("", "")
    }
}

impl Element {
    /// A new element in namespace `ns`.
    pub fn new(ns: &str, local: &str) -> Self {
        Element {
            name: Name::new(ns, local),
            ..Default::default()
        }
    }

    /// Builder: add an attribute.
    pub fn attr(mut self, ns: &str, local: &str, value: impl Into<String>) -> Self {
        self.set_attr(ns, local, value);
        self
    }

    /// Set (replace or add) an attribute.
    pub fn set_attr(&mut self, ns: &str, local: &str, value: impl Into<String>) {
        let value = value.into();
        if let Some(a) = self
            .attrs
            .iter_mut()
            .find(|a| a.name.ns == ns && a.name.local == local)
        {
            a.value = value;
        } else {
            self.attrs.push(Attr {
                name: Name::new(ns, local),
                prefix: String::new(),
                value,
            });
        }
    }

    /// Builder: add a child element.
    pub fn child(mut self, e: Element) -> Self {
        self.children.push(Node::Element(e));
        self
    }

    /// Builder: add text.
    pub fn text(mut self, t: impl Into<String>) -> Self {
        self.children.push(Node::Text(t.into()));
        self
    }

    /// Builder: add `<local>text</local>` in namespace `ns`.
    pub fn leaf(self, ns: &str, local: &str, text: impl Into<String>) -> Self {
        self.child(Element::new(ns, local).text(text))
    }

    /// Whether this element is `ns:local`.
    pub fn is(&self, ns: &str, local: &str) -> bool {
        self.name.ns == ns && self.name.local == local
    }

    /// The value of attribute `local` in namespace `ns`.
    pub fn get_attr(&self, ns: &str, local: &str) -> Option<&str> {
        self.attrs
            .iter()
            .find(|a| a.name.ns == ns && a.name.local == local)
            .map(|a| a.value.as_str())
    }

    /// The value of attribute `local` in any of `nss` (OVF writers disagree on qualification).
    pub fn attr_any(&self, nss: &[&str], local: &str) -> Option<&str> {
        nss.iter().find_map(|ns| self.get_attr(ns, local))
    }

    /// Child elements.
    pub fn elements(&self) -> impl Iterator<Item = &Element> {
        self.children.iter().filter_map(|n| match n {
            Node::Element(e) => Some(e),
            Node::Text(_) => None,
        })
    }

    /// The first child element with this local name (any namespace).
    pub fn find_local(&self, local: &str) -> Option<&Element> {
        self.elements().find(|e| e.name.local == local)
    }

    /// Text content of the element (concatenated direct text children), trimmed.
    pub fn text_content(&self) -> String {
        let mut s = String::new();
        for n in &self.children {
            if let Node::Text(t) = n {
                s.push_str(t);
            }
        }
        s.trim().to_string()
    }

    /// Trimmed text of the first child element with this local name.
    pub fn child_text(&self, local: &str) -> Option<String> {
        self.find_local(local).map(|e| e.text_content())
    }

    /// Number of elements in this subtree.
    fn count(&self) -> usize {
        1 + self.elements().map(Element::count).sum::<usize>()
    }
}

/// Parse a whole document and return its root element.
pub fn parse(text: &str) -> Result<Element> {
    if text.len() > MAX_DOCUMENT_BYTES {
        return Err(OvfError::Invalid(format!(
            "XML document is {} bytes, more than the {MAX_DOCUMENT_BYTES}-byte limit",
            text.len()
        )));
    }
    let mut reader = Reader::from_str(text);
    reader.config_mut().trim_text(false);
    reader.config_mut().check_end_names = true;
    // Stack of open elements with the namespace scope each one introduced.
    let mut stack: Vec<(Element, BTreeMap<String, String>)> = Vec::new();
    let mut scopes: Vec<BTreeMap<String, String>> = vec![BTreeMap::new()];
    let mut root: Option<Element> = None;
    let mut elements = 0usize;
    loop {
        let ev = reader
            .read_event()
            .map_err(|e| OvfError::Xml(format!("at byte {}: {e}", reader.buffer_position())))?;
        match ev {
            Event::Start(start) | Event::Empty(start) if root.is_some() => {
                let _ = start;
                return Err(OvfError::Xml("content after the root element".into()));
            }
            Event::Start(start) => {
                elements += 1;
                if elements > MAX_ELEMENTS || stack.len() >= MAX_DEPTH {
                    return Err(OvfError::Xml(format!(
                        "document exceeds {MAX_ELEMENTS} elements or {MAX_DEPTH} levels"
                    )));
                }
                let (el, scope) = start_element(&start, &scopes)?;
                scopes.push(scope.clone());
                stack.push((el, scope));
            }
            Event::Empty(start) => {
                elements += 1;
                if elements > MAX_ELEMENTS {
                    return Err(OvfError::Xml(format!(
                        "document exceeds {MAX_ELEMENTS} elements"
                    )));
                }
                let (el, _) = start_element(&start, &scopes)?;
                match stack.last_mut() {
                    Some((parent, _)) => parent.children.push(Node::Element(el)),
                    None => root = Some(el),
                }
            }
            Event::End(_) => {
                let Some((el, _)) = stack.pop() else {
                    return Err(OvfError::Xml("unbalanced end tag".into()));
                };
                scopes.pop();
                match stack.last_mut() {
                    Some((parent, _)) => parent.children.push(Node::Element(el)),
                    None => root = Some(el),
                }
            }
            Event::Text(t) => {
                let s = t
                    .unescape()
                    .map_err(|e| OvfError::Xml(format!("text: {e}")))?;
                if let Some((parent, _)) = stack.last_mut() {
                    parent.children.push(Node::Text(s.into_owned()));
                } else if !s.trim().is_empty() {
                    return Err(OvfError::Xml("text outside the root element".into()));
                }
            }
            Event::CData(t) => {
                let s = String::from_utf8_lossy(&t).into_owned();
                if let Some((parent, _)) = stack.last_mut() {
                    parent.children.push(Node::Text(s));
                }
            }
            Event::DocType(_) => {
                return Err(OvfError::Xml("DOCTYPE declarations are refused".into()));
            }
            Event::Eof => break,
            _ => {}
        }
    }
    if !stack.is_empty() {
        return Err(OvfError::Xml(format!(
            "{} element(s) not closed",
            stack.len()
        )));
    }
    root.ok_or_else(|| OvfError::Xml("no root element".into()))
}

fn start_element(
    start: &BytesStart<'_>,
    scopes: &[BTreeMap<String, String>],
) -> Result<(Element, BTreeMap<String, String>)> {
    let mut scope = scopes.last().cloned().unwrap_or_default();
    let mut raw_attrs = Vec::new();
    let mut decls = Vec::new();
    for a in start.attributes() {
        let a = a.map_err(|e| OvfError::Xml(format!("attribute: {e}")))?;
        let key = String::from_utf8_lossy(a.key.as_ref()).into_owned();
        check_name(&key)?;
        let value = a
            .unescape_value()
            .map_err(|e| OvfError::Xml(format!("attribute {key}: {e}")))?
            .into_owned();
        if key == "xmlns" {
            scope.insert(String::new(), value.clone());
            decls.push((String::new(), value));
        } else if let Some(p) = key.strip_prefix("xmlns:") {
            scope.insert(p.to_string(), value.clone());
            decls.push((p.to_string(), value));
        } else {
            raw_attrs.push((key, value));
        }
    }
    let qname = String::from_utf8_lossy(start.name().as_ref()).into_owned();
    check_name(&qname)?;
    let (prefix, local) = split_qname(&qname);
    // Some producers use prefixes they never declare; such names get a placeholder namespace so
    // the element is kept (and written back with a declaration) rather than losing the document.
    let ns = resolve(&scope, prefix, true).unwrap_or_else(|| undeclared(prefix));
    let mut attrs = Vec::with_capacity(raw_attrs.len());
    for (key, value) in raw_attrs {
        let (p, l) = split_qname(&key);
        let ns = resolve(&scope, p, false).unwrap_or_else(|| undeclared(p));
        attrs.push(Attr {
            name: Name::new(&ns, l),
            prefix: p.to_string(),
            value,
        });
    }
    let el = Element {
        name: Name::new(&ns, local),
        prefix: prefix.to_string(),
        attrs,
        children: Vec::new(),
        decls,
    };
    Ok((el, scope))
}

/// Refuse an element or attribute name that is not an XML qualified name (`prefix:local`, each
/// part starting with a letter or `_`, then letters, digits, `_`, `-`, `.`), so every name parsed
/// can be written back and parsed again (quick-xml accepts e.g. `= w:x` as an attribute key).
fn check_name(qname: &str) -> Result<()> {
    let ok = match qname.split_once(':') {
        Some((p, l)) => is_ncname(p) && is_ncname(l),
        None => is_ncname(qname),
    };
    if ok {
        Ok(())
    } else {
        Err(OvfError::Xml(format!("invalid XML name {qname:?}")))
    }
}

/// Whether `p` is an XML name without a colon (the part of a qualified name on either side of it).
pub(crate) fn is_ncname(p: &str) -> bool {
    let mut c = p.chars();
    c.next().is_some_and(|f| f.is_alphabetic() || f == '_')
        && c.all(|ch| ch.is_alphanumeric() || matches!(ch, '_' | '-' | '.'))
}

/// Placeholder namespace for an undeclared prefix.
fn undeclared(prefix: &str) -> String {
    format!("urn:vmi:undeclared-prefix:{prefix}")
}

fn split_qname(q: &str) -> (&str, &str) {
    match q.split_once(':') {
        Some((p, l)) => (p, l),
        None => ("", q),
    }
}

fn resolve(scope: &BTreeMap<String, String>, prefix: &str, is_element: bool) -> Option<String> {
    if prefix == "xml" {
        return Some(XML_NS.to_string());
    }
    if prefix.is_empty() {
        if is_element {
            return Some(scope.get("").cloned().unwrap_or_default());
        }
        return Some(String::new());
    }
    scope.get(prefix).cloned()
}

/// Serialize `root` as a standalone document. `preferred` maps namespace URIs to prefixes (`""` for
/// the default namespace, which only elements use); other namespaces keep their original prefix when
/// free, or get `ns1`, `ns2`, …. All declarations go on the root element.
pub fn write_document(root: &Element, preferred: &[(&str, &str)]) -> String {
    let mut uris = Vec::new();
    collect_ns(root, &mut uris);
    let mut map: BTreeMap<String, String> = BTreeMap::new();
    let mut used: Vec<String> = Vec::new();
    for (uri, p) in preferred {
        if uris.iter().any(|(u, _)| u == uri) && !used.iter().any(|u| u == p) {
            map.insert(uri.to_string(), p.to_string());
            used.push(p.to_string());
        }
    }
    let mut n = 0;
    for (uri, hint) in &uris {
        if uri.is_empty() || uri == XML_NS || map.contains_key(uri) {
            continue;
        }
        let p = if !hint.is_empty() && hint != "xml" && !used.contains(hint) {
            hint.clone()
        } else {
            loop {
                n += 1;
                let c = format!("ns{n}");
                if !used.contains(&c) {
                    break c;
                }
            }
        };
        used.push(p.clone());
        map.insert(uri.clone(), p);
    }
    let mut out = String::from("<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n");
    write_element(root, &map, true, 0, &mut out);
    out.push('\n');
    out
}

fn collect_ns(e: &Element, out: &mut Vec<(String, String)>) {
    let mut add = |uri: &str, hint: &str| {
        if !out.iter().any(|(u, _)| u == uri) {
            out.push((uri.to_string(), hint.to_string()));
        }
    };
    add(&e.name.ns, &e.prefix);
    for a in &e.attrs {
        if !a.name.ns.is_empty() {
            add(&a.name.ns, &a.prefix);
        }
    }
    for (p, u) in &e.decls {
        // Declarations are kept so that QName-valued attributes (xsi:type) still resolve.
        if !p.is_empty() {
            add(u, p);
        }
    }
    for c in e.elements() {
        collect_ns(c, out);
    }
}

fn qualified(map: &BTreeMap<String, String>, name: &Name, is_element: bool) -> String {
    if name.ns.is_empty() {
        return name.local.clone();
    }
    if name.ns == XML_NS {
        return format!("xml:{}", name.local);
    }
    match map.get(&name.ns) {
        Some(p) if p.is_empty() && is_element => name.local.clone(),
        Some(p) if !p.is_empty() => format!("{p}:{}", name.local),
        // Attributes cannot use the default namespace; fall back to the element-only mapping.
        _ => name.local.clone(),
    }
}

fn write_element(
    e: &Element,
    map: &BTreeMap<String, String>,
    root: bool,
    depth: usize,
    out: &mut String,
) {
    let q = qualified(map, &e.name, true);
    let _ = write!(out, "<{q}");
    if root {
        for (uri, p) in map {
            if p.is_empty() {
                let _ = write!(out, " xmlns=\"{}\"", escape(uri));
            } else {
                let _ = write!(out, " xmlns:{p}=\"{}\"", escape(uri));
            }
        }
    }
    for a in &e.attrs {
        let _ = write!(
            out,
            " {}=\"{}\"",
            qualified(map, &a.name, false),
            escape(&a.value)
        );
    }
    if e.children.is_empty() {
        out.push_str("/>");
        return;
    }
    out.push('>');
    let only_text = e.children.iter().all(|c| matches!(c, Node::Text(_)));
    if only_text {
        for c in &e.children {
            if let Node::Text(t) = c {
                out.push_str(&escape(t));
            }
        }
    } else {
        for c in &e.children {
            match c {
                Node::Element(ce) => {
                    out.push('\n');
                    out.push_str(&"  ".repeat(depth + 1));
                    write_element(ce, map, false, depth + 1, out);
                }
                Node::Text(t) if !t.trim().is_empty() => out.push_str(&escape(t.trim())),
                Node::Text(_) => {}
            }
        }
        out.push('\n');
        out.push_str(&"  ".repeat(depth));
    }
    let _ = write!(out, "</{q}>");
}

/// Escape text for element content and attribute values.
pub fn escape(s: &str) -> String {
    let mut o = String::with_capacity(s.len());
    for ch in s.chars() {
        match ch {
            '&' => o.push_str("&amp;"),
            '<' => o.push_str("&lt;"),
            '>' => o.push_str("&gt;"),
            '"' => o.push_str("&quot;"),
            '\'' => o.push_str("&apos;"),
            '\n' => o.push_str("&#10;"),
            '\r' => o.push_str("&#13;"),
            '\t' => o.push_str("&#9;"),
            c => o.push(c),
        }
    }
    o
}

/// Element count of a tree (used by tests and limits).
pub fn element_count(e: &Element) -> usize {
    e.count()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_resolves_default_and_prefixed_namespaces() {
        let doc = r#"<a xmlns="urn:x" xmlns:p="urn:p"><p:b p:k="v">t &amp; u</p:b><c k="1"/></a>"#;
        let root = parse(doc).unwrap();
        assert!(root.is("urn:x", "a"));
        let b = root.find_local("b").unwrap();
        assert!(b.is("urn:p", "b"));
        assert_eq!(b.get_attr("urn:p", "k"), Some("v"));
        assert_eq!(b.text_content(), "t & u");
        let c = root.find_local("c").unwrap();
        assert!(c.is("urn:x", "c"));
        assert_eq!(c.get_attr("", "k"), Some("1"));
    }

    #[test]
    fn write_then_parse_gives_the_same_tree_modulo_prefixes() {
        let doc = r#"<a xmlns="urn:x" xmlns:p="urn:p"><p:b p:k="v&quot;">x&lt;y</p:b></a>"#;
        let root = parse(doc).unwrap();
        let text = write_document(&root, &[("urn:x", "")]);
        let again = parse(&text).unwrap();
        assert_eq!(element_count(&again), 2);
        let b = again.find_local("b").unwrap();
        assert_eq!(b.get_attr("urn:p", "k"), Some("v\""));
        assert_eq!(b.text_content(), "x<y");
    }

    #[test]
    fn parse_keeps_undeclared_prefixes_and_rejects_doctype() {
        assert!(parse("<q:a/>").unwrap().name.ns.contains("undeclared"));
        assert!(parse("<!DOCTYPE a [<!ENTITY x 'y'>]><a/>").is_err());
        assert!(parse("<a><b></a>").is_err());
        assert!(parse("").is_err());
    }

    #[test]
    fn parse_caps_nesting_depth() {
        let deep = "<a>".repeat(MAX_DEPTH + 1) + &"</a>".repeat(MAX_DEPTH + 1);
        assert!(parse(&deep).is_err());
    }
}
