//! A list response parsed item by item: each item is handed over (and typed) as soon as it is
//! read, so that a 20,000-object list from the watch cache (which comes in one piece) never
//! exists as 20,000 JSON trees at once.

use std::fmt;

use serde::de::{DeserializeSeed, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};

/// What a list says besides its items.
#[derive(Debug, Default)]
pub struct Page {
    pub resource_version: String,
    /// The next page's token.
    pub next: Option<String>,
}

#[derive(serde::Deserialize)]
struct Meta {
    #[serde(rename = "resourceVersion", default)]
    resource_version: Option<String>,
    #[serde(rename = "continue", default)]
    next: Option<String>,
}

/// Parses a `...List` body, calling `each` for every item in order.
pub fn parse(body: &str, each: &mut dyn FnMut(serde_json::Value)) -> Result<Page, serde_json::Error> {
    let mut de = serde_json::Deserializer::from_str(body);
    let page = ListSeed { each }.deserialize(&mut de)?;
    de.end()?;
    Ok(page)
}

struct ListSeed<'a> {
    each: &'a mut dyn FnMut(serde_json::Value),
}

impl<'de> DeserializeSeed<'de> for ListSeed<'_> {
    type Value = Page;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Page, D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for ListSeed<'_> {
    type Value = Page;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a Kubernetes list object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Page, A::Error> {
        let ListSeed { each } = self;
        let mut page = Page::default();
        while let Some(key) = map.next_key::<String>()? {
            match key.as_str() {
                "metadata" => {
                    let m: Meta = map.next_value()?;
                    page.resource_version = m.resource_version.unwrap_or_default();
                    page.next = m.next.filter(|c| !c.is_empty());
                }
                "items" => map.next_value_seed(Items { each: &mut *each })?,
                _ => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        Ok(page)
    }
}

struct Items<'a> {
    each: &'a mut dyn FnMut(serde_json::Value),
}

impl<'de> DeserializeSeed<'de> for Items<'_> {
    type Value = ();
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Items<'_> {
    type Value = ();
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a list of objects")
    }

    fn visit_unit<E>(self) -> Result<(), E> {
        Ok(())
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        while let Some(item) = seq.next_element::<serde_json::Value>()? {
            (self.each)(item);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn items_come_one_by_one_with_the_page_metadata() {
        let body = r#"{"kind":"PodList","apiVersion":"v1","metadata":{"resourceVersion":"42","continue":"abc"},
                      "items":[{"metadata":{"name":"a"}},{"metadata":{"name":"b"}}]}"#;
        let mut names = Vec::new();
        let page = parse(body, &mut |v| names.push(v["metadata"]["name"].as_str().unwrap_or("").to_string())).expect("parse");
        assert_eq!(names, ["a", "b"]);
        assert_eq!(page.resource_version, "42");
        assert_eq!(page.next.as_deref(), Some("abc"));
        let page = parse(r#"{"metadata":{"resourceVersion":"7","continue":""},"items":null}"#, &mut |_| panic!("no items")).expect("parse");
        assert_eq!((page.resource_version.as_str(), page.next), ("7", None));
        assert!(parse(r#"{"items":[1,"#, &mut |_| {}).is_err());
    }
}
