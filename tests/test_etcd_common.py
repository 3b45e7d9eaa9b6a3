"""Pure logic of the etcd clients: endpoint credentials and their masking, key paths (upstream's
path.Join), the adaptive request deadline, and the client certificate checks."""

from __future__ import annotations

import datetime
import os
import ssl
from urllib.parse import quote, unquote

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from lab.etcd import DAY, make_client_cert, make_tls_certs
from pyflanneld.options import mask_url_passwords, parse_args
from pyflanneld.subnet import etcd_tls
from pyflanneld.subnet.etcd_common import EtcdSettings, RequestDeadline, go_path_join, parse_endpoints
from pyflanneld.subnet.etcdv2 import EtcdV2Store
from pyflanneld.subnet.etcdv3 import EtcdV3Store
from pyflanneld.subnet.store import StoreError


# -- key paths ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(("prefix", "v3_key", "v2_url"), [
    ("/coreos.com/network", "/coreos.com/network/config", "/v2/keys/coreos.com/network/config"),
    # upstream v0.17.0 (etcd v2) reads /v2/keys/net/config for all three
    ("net", "net/config", "/v2/keys/net/config"),
    ("net/", "net/config", "/v2/keys/net/config"),
    ("/net/", "/net/config", "/v2/keys/net/config"),
    # upstream v0.20.2 (etcd v3): Go's path.Join, no slash added at the front
    ("net/a", "net/a/config", "/v2/keys/net/a/config"),
    ("/net/b/", "/net/b/config", "/v2/keys/net/b/config"),
    ("/net//c", "/net/c/config", "/v2/keys/net/c/config"),
])
def test_keys_follow_upstreams_path_join(prefix, v3_key, v2_url):
    s = EtcdSettings.from_flags(endpoints="http://192.0.2.1:2379", prefix=prefix)
    v3, v2 = EtcdV3Store(s), EtcdV2Store(s)
    assert v3._config_key == v3_key.encode()
    assert v3._subnets == (v3_key.removesuffix("config") + "subnets/").encode()
    assert v2._url("config") == "http://192.0.2.1:2379" + v2_url
    assert v2._url("subnets/10.1.2.0-24") == "http://192.0.2.1:2379" + v2_url.removesuffix("config") + "subnets/10.1.2.0-24"


def test_go_path_join_edge_cases():
    assert go_path_join("", "config") == "config"
    assert go_path_join("/", "config") == "/config"
    assert go_path_join("//a/./b/../c/", "config") == "/a/c/config"
    assert go_path_join("", "") == ""


def test_v2_url_escapes_like_go():
    s = EtcdSettings.from_flags(endpoints="http://192.0.2.1:2379", prefix="/my net?#x")
    assert EtcdV2Store(s)._url("config") == "http://192.0.2.1:2379/v2/keys/my%20net%3F%23x/config"


# -- credentials in endpoint URLs ----------------------------------------------------------------------
def test_credentials_in_endpoints_are_used_and_decoded():
    s = EtcdSettings.from_flags(endpoints="http://flannel:p%40ss@192.0.2.1:2379,http://192.0.2.2:2379", prefix="/x")
    assert (s.username, s.password) == ("flannel", "p@ss")
    assert [e.url for e in s.endpoints] == ["http://192.0.2.1:2379", "http://192.0.2.2:2379"]
    assert "p@ss" not in repr(s)
    # a user in the URL, the password from FLANNELD_ETCD_PASSWORD: combined
    s = EtcdSettings.from_flags(endpoints="http://flannel@192.0.2.1:2379", prefix="/x", password="pw")
    assert (s.username, s.password) == ("flannel", "pw")
    # the same credentials in both places: fine
    s = EtcdSettings.from_flags(endpoints="http://flannel:pw@h:1", prefix="/x", username="flannel", password="pw")
    assert (s.username, s.password) == ("flannel", "pw")


@pytest.mark.parametrize(("endpoints", "username", "password", "says"), [
    ("http://a:SECRET1@h:1", "b", "", "--etcd-username"),
    ("http://a:SECRET1@h:1", "", "SECRET2", "--etcd-password"),
    ("http://a:SECRET1@h:1,http://a:SECRET2@h:2", "", "", "different credentials"),
    ("http://a:SECRET1@h:99999", "", "", "bad port"),
    ("ftp://a:SECRET1@h:1", "", "", "expected http(s)"),
])
def test_conflicting_or_bad_credentials_are_one_line_without_the_password(endpoints, username, password, says):
    with pytest.raises(ValueError) as e:
        EtcdSettings.from_flags(endpoints=endpoints, prefix="/x", username=username, password=password)
    msg = str(e.value)
    assert says in msg and "\n" not in msg
    assert "SECRET1" not in msg and "SECRET2" not in msg


def test_start_up_options_mask_every_password():
    o = parse_args(["--etcd-endpoints", "http://u:SECRET1@h:1,u:SECRET2@h2:2", "--etcd-password", "SECRET3"])
    shown = repr(o.redacted())
    assert "SECRET" not in shown
    assert "http://u:***@h:1,u:***@h2:2" in shown and "'etcd-password': '***'" in shown


_TEXT = st.characters(exclude_categories=("Cs",))


@given(user=st.text(_TEXT, min_size=1, max_size=10), password=st.text(_TEXT, min_size=1, max_size=40))
def test_any_password_in_an_endpoint_is_masked_and_round_trips(user, password):
    url = f"https://{quote(user, safe='')}:{quote(password, safe='')}@etcd.example:2379"
    masked = mask_url_passwords(f"{url},http://other:2379")
    assert masked == f"https://{quote(user, safe='')}:***@etcd.example:2379,http://other:2379"
    eps, u, p = parse_endpoints(url)
    assert (u, p) == (user, password)
    assert [e.url for e in eps] == ["https://etcd.example:2379"]


@given(password=st.text(st.characters(exclude_categories=("Cs", "Cc")), min_size=1, max_size=30))
def test_raw_passwords_are_masked_even_unescaped(password):
    """Whatever the password holds — '/', '@', ',', ' ', ':' unencoded (base64 passwords have '/'):
    masked in the start-up line and in errors, and used as written (percent escapes aside)."""
    assume(not ("," in password and password.split(",")[0].isdecimal()))  # split_urls: ambiguous, documented
    spec = f"http://user:{password}@10.0.0.1:2379,http://10.0.0.2:2379"
    assert mask_url_passwords(spec) == "http://user:***@10.0.0.1:2379,http://10.0.0.2:2379"
    eps, u, p = parse_endpoints(spec)
    assert [e.url for e in eps] == ["http://10.0.0.1:2379", "http://10.0.0.2:2379"]
    assert (u, p) == ("user", unquote(password))


@pytest.mark.parametrize("password", ["pa/ss", "a+b/c==", "pa ss", "pa,ss", "a,b:c", "p@ss", "pa?ss#x"])
def test_a_password_with_url_delimiters_never_shows(password):
    for spec in (f"http://user:{password}@h:2379", f"http://user:{password}@h:bad", f"user:{password}@h:2379"):
        assert password not in mask_url_passwords(spec)
        try:
            s = EtcdSettings.from_flags(endpoints=spec, prefix="/x")
        except ValueError as e:
            assert password not in str(e) and "bad port" in str(e)
        else:
            assert (s.username, s.password) == ("user", password)
            assert password not in repr(s)
    assert password not in repr(parse_args(["--etcd-endpoints", f"http://user:{password}@h:2379"]).redacted())


def test_a_password_without_a_user_name_is_refused():
    with pytest.raises(ValueError, match="carries a password but no user name") as e:
        EtcdSettings.from_flags(endpoints="http://:SECRET1@h:2379", prefix="/x")
    assert "SECRET1" not in str(e.value)


# -- the adaptive deadline -----------------------------------------------------------------------------
def test_request_deadline_doubles_on_timeouts_and_comes_back_after_answers():
    d = RequestDeadline(5.0, max_s=60.0)
    assert d.value_s == 5.0
    assert [d.timed_out() for _ in range(5)] == [10.0, 20.0, 40.0, 60.0, None]
    d.answered(6.5)  # a slow link: stays long enough for it
    assert d.value_s == 26.0
    d.answered(0.01)  # fast again: back to the base
    assert d.value_s == 5.0


# -- client certificate checks -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    d = tmp_path_factory.mktemp("pki")
    return make_tls_certs(d), d


def _check(cert, key, now=None):
    etcd_tls.check_tls_files(str(cert), cert.read_bytes(), str(key), key.read_bytes(), now=now)


def test_good_client_certificate_passes(pki):
    files, _ = pki
    os.chmod(files.client_key, 0o600)
    _check(files.client_cert, files.client_key)


def test_expired_and_not_yet_valid_certificates_are_named(pki):
    files, d = pki
    cert, key = make_client_cert(files, d, name="expired", not_before=-10 * DAY, not_after=-DAY)
    with pytest.raises(StoreError, match=r"client certificate --etcd-certfile .*expired\.pem expired on \d{4}-\d\d-\d\d"):
        _check(cert, key)
    cert, key = make_client_cert(files, d, name="future", not_before=DAY, not_after=10 * DAY)
    with pytest.raises(StoreError, match="is not valid before .*clock"):
        _check(cert, key)
    # and valid again from the point of view of a later clock
    _check(cert, key, now=datetime.datetime.now(datetime.UTC) + datetime.timedelta(days=2))


def test_key_of_another_certificate_is_named(pki):
    files, _ = pki
    with pytest.raises(StoreError, match="does not match the certificate.*key does not match certificate"):
        _check(files.client_cert, files.server_key)


def test_garbage_cert_or_key_is_one_line(pki, tmp_path):
    files, _ = pki
    junk = tmp_path / "junk.pem"
    junk.write_text("not a pem\n")
    with pytest.raises(StoreError, match="holds no PEM certificate"):
        _check(junk, files.client_key)
    with pytest.raises(StoreError, match="holds no usable PEM private key"):
        _check(files.client_cert, junk)


def test_ca_file_not_in_pem_is_one_line_naming_it_and_the_fix(pki, tmp_path):
    files, _ = pki
    etcd_tls.check_ca_file(str(files.ca), files.ca.read_bytes())  # the real one: fine
    der = tmp_path / "ca.der"
    der.write_bytes(ssl.PEM_cert_to_DER_cert(files.ca.read_text()))
    cases = {der: "is a DER (binary) certificate, not PEM; convert it: openssl x509 -inform DER",
             tmp_path / "empty.pem": "is empty; give the CA certificate(s)",
             tmp_path / "junk.pem": "holds no usable PEM certificate",
             tmp_path / "key.pem": "holds no usable PEM certificate"}
    (tmp_path / "empty.pem").write_text("\n")
    (tmp_path / "junk.pem").write_bytes(b"\xff\xfe not a certificate")
    (tmp_path / "key.pem").write_bytes(files.client_key.read_bytes())
    for path, says in cases.items():
        with pytest.raises(StoreError, match="^--etcd-cafile ") as e:
            EtcdSettings.from_flags(endpoints="https://h:2379", prefix="/x", cafile=str(path)).read_tls_files()
        assert says in str(e.value) and str(path) in str(e.value) and "\n" not in str(e.value)
