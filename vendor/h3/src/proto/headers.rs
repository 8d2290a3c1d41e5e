use std::{
    convert::TryFrom,
    fmt,
    iter::{IntoIterator, Iterator},
    str::FromStr,
};

use http::{
    header::{self, HeaderName, HeaderValue},
    uri::{self, Authority, Parts, PathAndQuery, Scheme, Uri},
    Extensions, HeaderMap, Method, StatusCode,
};

use crate::{
    ext::Protocol,
    qpack::{HeaderField, SharedField},
};

#[derive(Debug)]
#[cfg_attr(test, derive(PartialEq, Clone))]
pub struct Header {
    pseudo: Pseudo,
    fields: HeaderMap,
}

#[allow(clippy::len_without_is_empty)]
impl Header {
    /// Creates a new `Header` frame data suitable for sending a request
    pub fn request(
        method: Method,
        uri: Uri,
        fields: HeaderMap,
        ext: Extensions,
    ) -> Result<Self, HeaderError> {
        match (uri.authority(), fields.get("host")) {
            (None, None) => Err(HeaderError::MissingAuthority),
            (Some(a), Some(h)) if a.as_str() != h => Err(HeaderError::ContradictedAuthority),
            _ => Ok(Self {
                pseudo: Pseudo::request(method, uri, ext),
                fields,
            }),
        }
    }

    pub fn response(status: StatusCode, fields: HeaderMap) -> Self {
        Self {
            pseudo: Pseudo::response(status),
            fields,
        }
    }

    pub fn trailer(fields: HeaderMap) -> Self {
        Self {
            //= https://www.rfc-editor.org/rfc/rfc9114#section-4.3
            //# Pseudo-header fields MUST NOT appear in trailer
            //# sections.
            pseudo: Pseudo::default(),
            fields,
        }
    }

    pub fn into_request_parts(
        self,
    ) -> Result<(Method, Uri, Option<Protocol>, HeaderMap), HeaderError> {
        let mut uri = Uri::builder();

        // quicar: the parsed pseudo-header values go in as they are (h3 made each a string
        // again, for the builder to copy and parse a second time).
        if let Some(path) = self.pseudo.path {
            uri = uri.path_and_query(path);
        }

        if let Some(scheme) = self.pseudo.scheme {
            uri = uri.scheme(scheme);
        }

        //= https://www.rfc-editor.org/rfc/rfc9114#section-4.3.1
        //# If the :scheme pseudo-header field identifies a scheme that has a
        //# mandatory authority component (including "http" and "https"), the
        //# request MUST contain either an :authority pseudo-header field or a
        //# Host header field.

        //= https://www.rfc-editor.org/rfc/rfc9114#section-4.3.1
        //= type=TODO
        //# If the scheme does not have a mandatory authority component and none
        //# is provided in the request target, the request MUST NOT contain the
        //# :authority pseudo-header or Host header fields.
        match (self.pseudo.authority, self.fields.get(header::HOST)) {
            (None, None) => return Err(HeaderError::MissingAuthority),
            (Some(a), None) => uri = uri.authority(a),
            (None, Some(h)) => uri = uri.authority(h.as_bytes()),
            //= https://www.rfc-editor.org/rfc/rfc9114#section-4.3.1
            //# If both fields are present, they MUST contain the same value.
            (Some(a), Some(h)) if a.as_str() != h => {
                return Err(HeaderError::ContradictedAuthority)
            }
            (Some(a), Some(_)) => uri = uri.authority(a),
        }

        Ok((
            self.pseudo.method.ok_or(HeaderError::MissingMethod)?,
            // When empty host field is built into an uri it fails
            //= https://www.rfc-editor.org/rfc/rfc9114#section-4.3.1
            //# If these fields are present, they MUST NOT be
            //# empty.
            uri.build().map_err(HeaderError::InvalidRequest)?,
            self.pseudo.protocol,
            self.fields,
        ))
    }

    pub fn into_response_parts(self) -> Result<(StatusCode, HeaderMap), HeaderError> {
        //= https://www.rfc-editor.org/rfc/rfc9114#section-4.3.2
        //= type=implication
        //# For responses, a single ":status" pseudo-header field is defined that
        //# carries the HTTP status code; see Section 15 of [HTTP].  This pseudo-
        //# header field MUST be included in all responses; otherwise, the
        //# response is malformed (see Section 4.1.2).
        Ok((
            self.pseudo.status.ok_or(HeaderError::MissingStatus)?,
            self.fields,
        ))
    }

    pub fn into_fields(self) -> HeaderMap {
        self.fields
    }

    // quicar: a request's field section written from the request by reference, with the
    // pseudo-headers `Header::request` would make (scheme `https` by default, path `/` when
    // empty but for OPTIONS, `:protocol` only on CONNECT) and its authority check.
    pub fn encode_request<W: bytes::BufMut>(
        block: &mut W,
        req: &http::Request<()>,
    ) -> Result<u64, &'static str> {
        use crate::qpack::encoder::{encode_field, encode_prefix};
        let uri = req.uri();
        let fields = req.headers();
        match (uri.authority(), fields.get(header::HOST)) {
            (None, None) => return Err("Failed to build request headers: no authority"),
            (Some(a), Some(h)) if a.as_str() != h => {
                return Err("Failed to build request headers: authority contradicts host")
            }
            _ => {}
        }
        let failed = |_| "Failed to encode headers";
        encode_prefix(block);
        let method = req.method();
        let mut size = encode_field(block, b":method", method.as_str().as_bytes()).map_err(failed)?;
        let scheme = uri.scheme_str().unwrap_or("https");
        size += encode_field(block, b":scheme", scheme.as_bytes()).map_err(failed)?;
        if let Some(authority) = uri.authority() {
            size += encode_field(block, b":authority", authority.as_str().as_bytes())
                .map_err(failed)?;
        }
        let path = match uri.path_and_query() {
            Some(p) if !p.path().is_empty() || method == Method::OPTIONS => p.as_str(),
            _ => "/",
        };
        size += encode_field(block, b":path", path.as_bytes()).map_err(failed)?;
        if method == Method::CONNECT {
            if let Some(protocol) = req.extensions().get::<Protocol>() {
                size += encode_field(block, b":protocol", protocol.as_str().as_bytes())
                    .map_err(failed)?;
            }
        }
        for (name, value) in fields {
            size += encode_field(block, name.as_str().as_bytes(), value.as_bytes())
                .map_err(failed)?;
        }
        Ok(size)
    }

    // quicar: the field section written straight from the pseudo-headers and the map, in
    // `HeaderIter`'s order, without a `HeaderField` (two copies) per field. Returns its size
    // as RFC 9114 §4.2.2 counts it.
    pub fn encode<W: bytes::BufMut>(
        &self,
        block: &mut W,
    ) -> Result<u64, crate::qpack::EncoderError> {
        use crate::qpack::encoder::{encode_field, encode_prefix};
        encode_prefix(block);
        let p = &self.pseudo;
        let mut size = 0;
        if let Some(method) = &p.method {
            size += encode_field(block, b":method", method.as_str().as_bytes())?;
        }
        if let Some(scheme) = &p.scheme {
            size += encode_field(block, b":scheme", scheme.as_str().as_bytes())?;
        }
        if let Some(authority) = &p.authority {
            size += encode_field(block, b":authority", authority.as_str().as_bytes())?;
        }
        if let Some(path) = &p.path {
            size += encode_field(block, b":path", path.as_str().as_bytes())?;
        }
        if let Some(status) = &p.status {
            size += encode_field(block, b":status", status.as_str().as_bytes())?;
        }
        if let Some(protocol) = &p.protocol {
            size += encode_field(block, b":protocol", protocol.as_str().as_bytes())?;
        }
        for (name, value) in &self.fields {
            size += encode_field(block, name.as_str().as_bytes(), value.as_bytes())?;
        }
        Ok(size)
    }

    pub fn len(&self) -> usize {
        self.pseudo.len() + self.fields.len()
    }

    pub fn size(&self) -> usize {
        self.pseudo.len() + self.fields.len()
    }

    #[cfg(test)]
    pub(crate) fn authory_mut(&mut self) -> &mut Option<Authority> {
        &mut self.pseudo.authority
    }
}

impl IntoIterator for Header {
    type Item = HeaderField;
    type IntoIter = HeaderIter;
    fn into_iter(self) -> Self::IntoIter {
        HeaderIter {
            pseudo: Some(self.pseudo),
            last_header_name: None,
            fields: self.fields.into_iter(),
        }
    }
}

pub struct HeaderIter {
    pseudo: Option<Pseudo>,
    last_header_name: Option<HeaderName>,
    fields: header::IntoIter<HeaderValue>,
}

/// quicar: a pseudo-header field with its name borrowed, not copied.
fn pseudo_field(name: &'static [u8], value: &[u8]) -> HeaderField {
    HeaderField {
        name: std::borrow::Cow::Borrowed(name),
        value: std::borrow::Cow::Owned(value.to_vec()),
    }
}

impl Iterator for HeaderIter {
    type Item = HeaderField;

    fn next(&mut self) -> Option<Self::Item> {
        //= https://www.rfc-editor.org/rfc/rfc9114#section-4.3
        //# All pseudo-header fields MUST appear in the header section before
        //# regular header fields.
        if let Some(ref mut pseudo) = self.pseudo {
            if let Some(method) = pseudo.method.take() {
                return Some(pseudo_field(b":method", method.as_str().as_bytes()));
            }

            if let Some(scheme) = pseudo.scheme.take() {
                return Some(pseudo_field(b":scheme", scheme.as_str().as_bytes()));
            }

            if let Some(authority) = pseudo.authority.take() {
                return Some(pseudo_field(b":authority", authority.as_str().as_bytes()));
            }

            if let Some(path) = pseudo.path.take() {
                return Some(pseudo_field(b":path", path.as_str().as_bytes()));
            }

            if let Some(status) = pseudo.status.take() {
                return Some(pseudo_field(b":status", status.as_str().as_bytes()));
            }

            if let Some(protocol) = pseudo.protocol.take() {
                return Some(pseudo_field(b":protocol", protocol.as_str().as_bytes()));
            }
        }

        self.pseudo = None;

        for (new_header_name, header_value) in self.fields.by_ref() {
            if let Some(new) = new_header_name {
                self.last_header_name = Some(new);
            }
            if let (Some(ref n), v) = (&self.last_header_name, header_value) {
                return Some((n.as_str(), v.as_bytes()).into());
            }
        }

        None
    }
}

impl TryFrom<Vec<HeaderField>> for Header {
    type Error = HeaderError;
    fn try_from(headers: Vec<HeaderField>) -> Result<Self, Self::Error> {
        Header::try_from(headers.into_iter().map(SharedField::from).collect::<Vec<_>>())
    }
}

/// quicar: non-standard field names the application sends on most messages (a sidecar's trace
/// context and deadline), set once: such a name is cloned from here instead of copied into a
/// new allocation, as `http` does for the standard names. `lengths` has bit `n` set when a name
/// is `n` bytes long, so other fields cost one test.
struct Interned {
    names: &'static [HeaderName],
    lengths: u64,
}

static INTERNED: std::sync::OnceLock<Interned> = std::sync::OnceLock::new();

/// quicar: names (lowercase, as `HeaderName::from_static` requires) that received field
/// sections parse without an allocation. Only the first call has an effect.
pub fn intern_field_names(names: &'static [HeaderName]) {
    let lengths = names
        .iter()
        .map(|n| n.as_str().len())
        .filter(|&len| len < 64)
        .fold(0u64, |acc, len| acc | 1 << len);
    let _ = INTERNED.set(Interned { names, lengths });
}

fn field_name(name: &[u8]) -> Result<HeaderName, http::header::InvalidHeaderName> {
    if let Some(interned) = INTERNED.get() {
        if name.len() < 64 && interned.lengths & (1 << name.len()) != 0 {
            if let Some(n) = interned.names.iter().find(|n| n.as_str().as_bytes() == name) {
                return Ok(n.clone());
            }
        }
    }
    HeaderName::from_lowercase(name)
}

impl TryFrom<Vec<SharedField>> for Header {
    type Error = HeaderError;
    fn try_from(headers: Vec<SharedField>) -> Result<Self, Self::Error> {
        // quicar: room for the few fields the receiver adds (a sidecar adds its facts), so the
        // map is not regrown and rehashed for them.
        let mut fields = HeaderMap::with_capacity(headers.len() + 6);
        let mut pseudo = Pseudo::default();
        let mut regular = false;

        for SharedField { name, value } in headers {
            // quicar: a regular field's value becomes the HeaderValue without a copy (it shares
            // the field section's bytes); names and pseudo-headers parse as before.
            if name.first().is_some_and(|b| *b != b':') {
                // quicar: RFC 9114 §4.2: a message with a connection-specific field, or a TE
                // other than "trailers", is malformed (h2 refuses them the same way; h3 took
                // them).
                match &name[..] {
                    b"connection" | b"keep-alive" | b"proxy-connection" | b"transfer-encoding"
                    | b"upgrade" => {
                        return Err(HeaderError::InvalidHeaderName(format!(
                            "connection-specific field {}",
                            String::from_utf8_lossy(&name)
                        )))
                    }
                    b"te" if &value[..] != b"trailers" => {
                        return Err(HeaderError::invalid_value(&name, b""));
                    }
                    _ => {}
                }
                let n = field_name(&name).map_err(|_| HeaderError::invalid_name(&name))?;
                let v = HeaderValue::from_maybe_shared(value)
                    .map_err(|_| HeaderError::invalid_value(&name, b""))?;
                fields.append(n, v);
                regular = true;
                continue;
            }
            // quicar: RFC 9114 §4.3: every pseudo-header comes before the regular fields, and
            // each at most once; a message that breaks either is malformed (h3 took it, the
            // last value of a repeated one winning).
            if regular {
                return Err(HeaderError::InvalidHeaderName(format!(
                    "{} after a regular field",
                    String::from_utf8_lossy(&name)
                )));
            }
            pseudo.len += 1;
            // (`pseudo.len` counts the pseudo-headers; only those reach here but an empty
            // name, which `Field::parse` refuses.)
            // quicar: :path and :authority keep the decoded bytes (the parse is the one
            // `from_str` makes, without the copy).
            if &name[..] == b":path" {
                let p = PathAndQuery::from_maybe_shared(value)
                    .map_err(|_| HeaderError::invalid_value(&name, b""))?;
                once(&mut pseudo.path, p, ":path")?;
                continue;
            }
            if &name[..] == b":authority" {
                let a = Authority::from_maybe_shared(value)
                    .map_err(|_| HeaderError::invalid_value(&name, b""))?;
                once(&mut pseudo.authority, a, ":authority")?;
                continue;
            }
            match Field::parse(name, value)? {
                Field::Method(m) => once(&mut pseudo.method, m, ":method")?,
                Field::Scheme(s) => once(&mut pseudo.scheme, s, ":scheme")?,
                Field::Authority(a) => once(&mut pseudo.authority, a, ":authority")?,
                Field::Path(p) => once(&mut pseudo.path, p, ":path")?,
                Field::Status(s) => once(&mut pseudo.status, s, ":status")?,
                Field::Header(_) => return Err(HeaderError::invalid_name(b"")),
                Field::Protocol(p) => once(&mut pseudo.protocol, p, ":protocol")?,
            }
        }

        Ok(Header { pseudo, fields })
    }
}

/// quicar: sets a pseudo-header that must come once.
fn once<T>(slot: &mut Option<T>, value: T, name: &str) -> Result<(), HeaderError> {
    if slot.replace(value).is_some() {
        return Err(HeaderError::InvalidHeaderName(format!("{name} twice")));
    }
    Ok(())
}

enum Field {
    Method(Method),
    Scheme(Scheme),
    Authority(Authority),
    Path(PathAndQuery),
    Status(StatusCode),
    Protocol(Protocol),
    Header((HeaderName, HeaderValue)),
}

impl Field {
    fn parse<N, V>(name: N, value: V) -> Result<Self, HeaderError>
    where
        N: AsRef<[u8]>,
        V: AsRef<[u8]>,
    {
        let name = name.as_ref();
        if name.is_empty() {
            return Err(HeaderError::InvalidHeaderName("name is empty".into()));
        }

        //= https://www.rfc-editor.org/rfc/rfc9114#section-10.3
        //# Requests or responses containing invalid field names MUST be treated
        //# as malformed.

        //= https://www.rfc-editor.org/rfc/rfc9114#section-10.3
        //# Any request or response that contains a
        //# character not permitted in a field value MUST be treated as
        //# malformed.

        //= https://www.rfc-editor.org/rfc/rfc9114#section-4.2
        //= type=implication
        //# A request or
        //# response containing uppercase characters in field names MUST be
        //# treated as malformed.

        if name[0] != b':' {
            return Ok(Field::Header((
                HeaderName::from_lowercase(name).map_err(|_| HeaderError::invalid_name(name))?,
                HeaderValue::from_bytes(value.as_ref())
                    .map_err(|_| HeaderError::invalid_value(name, value))?,
            )));
        }

        Ok(match name {
            b":scheme" => Field::Scheme(try_value(name, value)?),
            //= https://www.rfc-editor.org/rfc/rfc9114#section-4.3.1
            //# If these fields are present, they MUST NOT be
            //# empty.
            b":authority" => Field::Authority(try_value(name, value)?),
            b":path" => Field::Path(try_value(name, value)?),
            b":method" => Field::Method(
                Method::from_bytes(value.as_ref())
                    .map_err(|_| HeaderError::invalid_value(name, value))?,
            ),
            b":status" => Field::Status(
                StatusCode::from_bytes(value.as_ref())
                    .map_err(|_| HeaderError::invalid_value(name, value))?,
            ),
            b":protocol" => Field::Protocol(try_value(name, value)?),
            _ => return Err(HeaderError::invalid_name(name)),
        })
    }
}

fn try_value<N, V, R>(name: N, value: V) -> Result<R, HeaderError>
where
    N: AsRef<[u8]>,
    V: AsRef<[u8]>,
    R: FromStr,
{
    let (name, value) = (name.as_ref(), value.as_ref());
    let s = std::str::from_utf8(value).map_err(|_| HeaderError::invalid_value(name, value))?;
    R::from_str(s).map_err(|_| HeaderError::invalid_value(name, value))
}

/// Pseudo-header fields have the same purpose as data from the first line of HTTP/1.X,
/// but are conveyed along with other headers. For example ':method' and ':path' in a
/// request, and ':status' in a response. They must be placed before all other fields,
/// start with ':', and be lowercase.
/// See RFC7540 section 8.1.2.1. for more details.
#[derive(Debug, Default)]
#[cfg_attr(test, derive(PartialEq, Clone))]
struct Pseudo {
    //= https://www.rfc-editor.org/rfc/rfc9114#section-4.3
    //= type=implication
    //# Endpoints MUST NOT
    //# generate pseudo-header fields other than those defined in this
    //# document.

    // Request
    method: Option<Method>,
    scheme: Option<Scheme>,
    authority: Option<Authority>,
    path: Option<PathAndQuery>,

    // Response
    status: Option<StatusCode>,

    protocol: Option<Protocol>,

    len: usize,
}

#[allow(clippy::len_without_is_empty)]
impl Pseudo {
    fn request(method: Method, uri: Uri, ext: Extensions) -> Self {
        let Parts {
            scheme,
            authority,
            path_and_query,
            ..
        } = uri::Parts::from(uri);

        //= https://www.rfc-editor.org/rfc/rfc9114#section-4.3.1
        //= type=implication
        //# This pseudo-header field MUST NOT be empty for "http" or "https"
        //# URIs; "http" or "https" URIs that do not contain a path component
        //# MUST include a value of / (ASCII 0x2f).
        let path = path_and_query.map_or_else(
            || PathAndQuery::from_static("/"),
            |path| {
                if path.path().is_empty() && method != Method::OPTIONS {
                    PathAndQuery::from_static("/")
                } else {
                    path
                }
            },
        );

        // If the method is connect, the `:protocol` pseudo-header MAY be defined
        //
        // See: [https://www.rfc-editor.org/rfc/rfc8441#section-4]
        let protocol = if method == Method::CONNECT {
            ext.get::<Protocol>().copied()
        } else {
            None
        };

        let len = 3 + authority.is_some() as usize + protocol.is_some() as usize;

        //= https://www.rfc-editor.org/rfc/rfc9114#section-4.3
        //= type=implication
        //# Pseudo-header fields defined for requests MUST NOT appear
        //# in responses; pseudo-header fields defined for responses MUST NOT
        //# appear in requests.

        //= https://www.rfc-editor.org/rfc/rfc9114#section-4.3.1
        //= type=implication
        //# All HTTP/3 requests MUST include exactly one value for the :method,
        //# :scheme, and :path pseudo-header fields, unless the request is a
        //# CONNECT request; see Section 4.4.
        Self {
            method: Some(method),
            scheme: scheme.or(Some(Scheme::HTTPS)),
            authority,
            path: Some(path),
            status: None,
            protocol,
            len,
        }
    }

    fn response(status: StatusCode) -> Self {
        //= https://www.rfc-editor.org/rfc/rfc9114#section-4.3
        //= type=implication
        //# Pseudo-header fields defined for requests MUST NOT appear
        //# in responses; pseudo-header fields defined for responses MUST NOT
        //# appear in requests.
        Pseudo {
            method: None,
            scheme: None,
            authority: None,
            path: None,
            status: Some(status),
            len: 1,
            protocol: None,
        }
    }

    fn len(&self) -> usize {
        self.len
    }
}

#[derive(Debug)]
pub enum HeaderError {
    InvalidHeaderName(String),
    InvalidHeaderValue(String),
    InvalidRequest(http::Error),
    MissingMethod,
    MissingStatus,
    MissingAuthority,
    ContradictedAuthority,
}

impl HeaderError {
    fn invalid_name<N>(name: N) -> Self
    where
        N: AsRef<[u8]>,
    {
        HeaderError::InvalidHeaderName(format!("{:?}", name.as_ref()))
    }

    fn invalid_value<N, V>(name: N, value: V) -> Self
    where
        N: AsRef<[u8]>,
        V: AsRef<[u8]>,
    {
        HeaderError::InvalidHeaderValue(format!(
            "{:?} {:?}",
            String::from_utf8_lossy(name.as_ref()),
            value.as_ref()
        ))
    }
}

impl std::error::Error for HeaderError {}

impl fmt::Display for HeaderError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HeaderError::InvalidHeaderName(h) => write!(f, "invalid header name: {}", h),
            HeaderError::InvalidHeaderValue(v) => write!(f, "invalid header value: {}", v),
            HeaderError::InvalidRequest(r) => write!(f, "invalid request: {}", r),
            HeaderError::MissingMethod => write!(f, "missing method in request headers"),
            HeaderError::MissingStatus => write!(f, "missing status in response headers"),
            HeaderError::MissingAuthority => write!(f, "missing authority"),
            HeaderError::ContradictedAuthority => {
                write!(f, "uri and authority field are in contradiction")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use assert_matches::assert_matches;

    #[test]
    fn request_has_no_authority_nor_host() {
        //= https://www.rfc-editor.org/rfc/rfc9114#section-4.3.1
        //= type=test
        //# If the :scheme pseudo-header field identifies a scheme that has a
        //# mandatory authority component (including "http" and "https"), the
        //# request MUST contain either an :authority pseudo-header field or a
        //# Host header field.
        let headers = Header::try_from(vec![(b":method", Method::GET.as_str()).into()]).unwrap();
        assert!(headers.pseudo.authority.is_none());
        assert_matches!(
            headers.into_request_parts(),
            Err(HeaderError::MissingAuthority)
        );
    }

    #[test]
    fn request_has_empty_authority() {
        //= https://www.rfc-editor.org/rfc/rfc9114#section-4.3.1
        //= type=test
        //# If these fields are present, they MUST NOT be
        //# empty.
        assert_matches!(
            Header::try_from(vec![
                (b":method", Method::GET.as_str()).into(),
                (b":authority", b"").into(),
            ]),
            Err(HeaderError::InvalidHeaderValue(_))
        );
    }

    #[test]
    fn request_has_empty_host() {
        //= https://www.rfc-editor.org/rfc/rfc9114#section-4.3.1
        //= type=test
        //# If these fields are present, they MUST NOT be
        //# empty.
        let headers = Header::try_from(vec![
            (b":method", Method::GET.as_str()).into(),
            (b"host", b"").into(),
        ])
        .unwrap();
        assert_matches!(
            headers.into_request_parts(),
            Err(HeaderError::InvalidRequest(_))
        );
    }

    #[test]
    fn request_has_authority() {
        //= https://www.rfc-editor.org/rfc/rfc9114#section-4.3.1
        //= type=test
        //# If the :scheme pseudo-header field identifies a scheme that has a
        //# mandatory authority component (including "http" and "https"), the
        //# request MUST contain either an :authority pseudo-header field or a
        //# Host header field.
        let headers = Header::try_from(vec![
            (b":method", Method::GET.as_str()).into(),
            (b":authority", b"test.com").into(),
        ])
        .unwrap();
        assert_matches!(headers.into_request_parts(), Ok(_));
    }

    #[test]
    fn request_has_host() {
        //= https://www.rfc-editor.org/rfc/rfc9114#section-4.3.1
        //= type=test
        //# If the :scheme pseudo-header field identifies a scheme that has a
        //# mandatory authority component (including "http" and "https"), the
        //# request MUST contain either an :authority pseudo-header field or a
        //# Host header field.
        let headers = Header::try_from(vec![
            (b":method", Method::GET.as_str()).into(),
            (b"host", b"test.com").into(),
        ])
        .unwrap();
        assert!(headers.pseudo.authority.is_none());
        assert_matches!(headers.into_request_parts(), Ok(_));
    }

    #[test]
    fn request_has_same_host_and_authority() {
        //= https://www.rfc-editor.org/rfc/rfc9114#section-4.3.1
        //= type=test
        //# If both fields are present, they MUST contain the same value.
        let headers = Header::try_from(vec![
            (b":method", Method::GET.as_str()).into(),
            (b":authority", b"test.com").into(),
            (b"host", b"test.com").into(),
        ])
        .unwrap();
        assert_matches!(headers.into_request_parts(), Ok(_));
    }
    #[test]
    fn request_has_different_host_and_authority() {
        //= https://www.rfc-editor.org/rfc/rfc9114#section-4.3.1
        //= type=test
        //# If both fields are present, they MUST contain the same value.
        let headers = Header::try_from(vec![
            (b":method", Method::GET.as_str()).into(),
            (b":authority", b"authority.com").into(),
            (b"host", b"host.com").into(),
        ])
        .unwrap();
        assert_matches!(
            headers.into_request_parts(),
            Err(HeaderError::ContradictedAuthority)
        );
    }

    #[test]
    fn preserves_duplicate_headers() {
        let headers = Header::try_from(vec![
            (b":method", Method::GET.as_str()).into(),
            (b":authority", b"test.com").into(),
            (b"set-cookie", b"foo=foo").into(),
            (b"set-cookie", b"bar=bar").into(),
            (b"other-header", b"other-header-value").into(),
        ])
        .unwrap();

        assert_eq!(
            headers
                .clone()
                .into_iter()
                .filter(|h| h.name.as_ref() == b"set-cookie")
                .collect::<Vec<_>>(),
            vec![
                HeaderField {
                    name: std::borrow::Cow::Borrowed(b"set-cookie"),
                    value: std::borrow::Cow::Borrowed(b"foo=foo")
                },
                HeaderField {
                    name: std::borrow::Cow::Borrowed(b"set-cookie"),
                    value: std::borrow::Cow::Borrowed(b"bar=bar")
                }
            ]
        );
        assert_eq!(
            headers
                .into_iter()
                .filter(|h| h.name.as_ref() == b"other-header")
                .collect::<Vec<_>>(),
            vec![HeaderField {
                name: std::borrow::Cow::Borrowed(b"other-header"),
                value: std::borrow::Cow::Borrowed(b"other-header-value")
            },]
        );
    }
}
