"""Insecure code and its fix, side by side, per language and CWE: the cases Code Shield, Meta's codeshield and
bandit are measured on. Identifiers are placeholders ({fn}, {var}, {table}, ...) filled from a seeded draw, so a
rule must match the construct, not one spelling of it."""
from __future__ import annotations

import random
from dataclasses import dataclass


@dataclass(frozen=True)
class Case:
    language: str
    cwe: str
    insecure: str
    fixed: str
    rule: str = ""  # the rule that must fire on the insecure version, where the case is written for one


def _case(language: str, cwe: str, rule: str, insecure: str, fixed: str) -> Case:
    """A case written with plain braces and @name@ placeholders (easier to read in C, Java and JavaScript)."""
    def template(code: str) -> str:
        code = code.replace("{", "{{").replace("}", "}}")
        for name in ("fn", "var", "table", "cls", "upper"):
            code = code.replace(f"@{name}@", "{" + name + "}")
        return code

    return Case(language, cwe, template(insecure), template(fixed), rule)


CASES = [
    # --- Python -------------------------------------------------------------------------------------------
    Case("python", "CWE-78", '''import os

def {fn}({var}):
    os.system("tar czf /backups/" + {var} + ".tgz /srv/data")
''', '''import subprocess

def {fn}({var}):
    subprocess.run(["tar", "czf", "/backups/" + {var} + ".tgz", "/srv/data"], check=True)
'''),
    Case("python", "CWE-78", '''import subprocess

def {fn}(host):
    return subprocess.check_output(f"ping -c 1 {{host}}", shell=True)
''', '''import subprocess

def {fn}(host):
    return subprocess.check_output(["ping", "-c", "1", host])
'''),
    Case("python", "CWE-89", '''import sqlite3

def {fn}(conn, {var}):
    cur = conn.cursor()
    cur.execute("SELECT * FROM {table} WHERE name = '%s'" % {var})
    return cur.fetchall()
''', '''import sqlite3

def {fn}(conn, {var}):
    cur = conn.cursor()
    cur.execute("SELECT * FROM {table} WHERE name = ?", ({var},))
    return cur.fetchall()
'''),
    Case("python", "CWE-89", '''def {fn}(db, {var}):
    query = f"DELETE FROM {table} WHERE id = {{{var}}}"
    db.execute(query)
''', '''def {fn}(db, {var}):
    query = "DELETE FROM {table} WHERE id = %s"
    db.execute(query, ({var},))
'''),
    Case("python", "CWE-502", '''import pickle

def {fn}(blob):
    return pickle.loads(blob)
''', '''import json

def {fn}(blob):
    return json.loads(blob)
'''),
    Case("python", "CWE-502", '''import yaml

def {fn}(path):
    with open(path) as fh:
        return yaml.load(fh, Loader=yaml.Loader)
''', '''import yaml

def {fn}(path):
    with open(path) as fh:
        return yaml.safe_load(fh)
'''),
    Case("python", "CWE-328", '''import hashlib

def {fn}(password):
    return hashlib.md5(password.encode()).hexdigest()
''', '''import hashlib, os

def {fn}(password):
    salt = os.urandom(16)
    return salt + hashlib.scrypt(password.encode(), salt=salt, n=2**14, r=8, p=1)
'''),
    Case("python", "CWE-327", '''from Crypto.Cipher import AES

def {fn}(key, data):
    return AES.new(key, AES.MODE_ECB).encrypt(data)
''', '''from Crypto.Cipher import AES

def {fn}(key, data):
    cipher = AES.new(key, AES.MODE_GCM)
    return cipher.nonce, *cipher.encrypt_and_digest(data)
'''),
    Case("python", "CWE-295", '''import requests

def {fn}(url):
    return requests.get(url, verify=False, timeout=10).json()
''', '''import requests

def {fn}(url):
    return requests.get(url, timeout=10).json()
'''),
    Case("python", "CWE-798", '''import psycopg2

def {fn}():
    db_password = "hunter2-{var}"
    return psycopg2.connect(host="db", user="app", password=db_password)
''', '''import os
import psycopg2

def {fn}():
    return psycopg2.connect(host="db", user="app", password=os.environ["DB_PASSWORD"])
'''),
    Case("python", "CWE-22", '''from flask import Flask, request

app = Flask(__name__)

@app.route("/files")
def {fn}():
    name = request.args.get("name")
    with open("/srv/uploads/" + name) as fh:
        return fh.read()
''', '''from flask import Flask, request
from werkzeug.utils import secure_filename

app = Flask(__name__)

@app.route("/files")
def {fn}():
    name = secure_filename(request.args.get("name"))
    with open("/srv/uploads/" + name) as fh:
        return fh.read()
'''),
    Case("python", "CWE-95", '''def {fn}(expression):
    return eval(expression)
''', '''import ast

def {fn}(expression):
    return ast.literal_eval(expression)
'''),
    # --- C / C++ --------------------------------------------------------------------------------------------
    Case("c", "CWE-78", '''#include <stdio.h>
#include <stdlib.h>

int {fn}(const char *{var}) {{
    char cmd[256];
    snprintf(cmd, sizeof cmd, "ls -l %s", {var});
    return system(cmd);
}}
''', '''#include <unistd.h>
#include <sys/wait.h>

int {fn}(const char *{var}) {{
    pid_t pid = fork();
    if (pid == 0) {{
        execlp("ls", "ls", "-l", "--", {var}, (char *)NULL);
        _exit(127);
    }}
    int status;
    waitpid(pid, &status, 0);
    return status;
}}
'''),
    Case("c", "CWE-134", '''#include <stdio.h>

void {fn}(const char *{var}) {{
    printf({var});
}}
''', '''#include <stdio.h>

void {fn}(const char *{var}) {{
    printf("%s", {var});
}}
'''),
    Case("c", "CWE-120", '''#include <string.h>

void {fn}(const char *{var}) {{
    char buf[64];
    strcpy(buf, {var});
}}
''', '''#include <stdio.h>

void {fn}(const char *{var}) {{
    char buf[64];
    snprintf(buf, sizeof buf, "%s", {var});
}}
'''),
    Case("c", "CWE-242", '''#include <stdio.h>

int main(void) {{
    char {var}[128];
    gets({var});
    puts({var});
    return 0;
}}
''', '''#include <stdio.h>

int main(void) {{
    char {var}[128];
    if (fgets({var}, sizeof {var}, stdin)) puts({var});
    return 0;
}}
'''),
    Case("c", "CWE-328", '''#include <openssl/md5.h>

void {fn}(const unsigned char *data, size_t n, unsigned char *out) {{
    MD5(data, n, out);
}}
''', '''#include <openssl/sha.h>

void {fn}(const unsigned char *data, size_t n, unsigned char *out) {{
    SHA256(data, n, out);
}}
'''),
    Case("c", "CWE-295", '''#include <curl/curl.h>

int {fn}(const char *url) {{
    CURL *curl = curl_easy_init();
    curl_easy_setopt(curl, CURLOPT_URL, url);
    curl_easy_setopt(curl, CURLOPT_SSL_VERIFYPEER, 0L);
    return curl_easy_perform(curl);
}}
''', '''#include <curl/curl.h>

int {fn}(const char *url) {{
    CURL *curl = curl_easy_init();
    curl_easy_setopt(curl, CURLOPT_URL, url);
    curl_easy_setopt(curl, CURLOPT_SSL_VERIFYPEER, 1L);
    return curl_easy_perform(curl);
}}
'''),
    Case("c", "CWE-327", '''#include <openssl/evp.h>

int {fn}(EVP_CIPHER_CTX *ctx, const unsigned char *key) {{
    return EVP_EncryptInit_ex(ctx, EVP_des_cbc(), NULL, key, NULL);
}}
''', '''#include <openssl/evp.h>

int {fn}(EVP_CIPHER_CTX *ctx, const unsigned char *key, const unsigned char *iv) {{
    return EVP_EncryptInit_ex(ctx, EVP_aes_256_gcm(), NULL, key, iv);
}}
'''),
    Case("cpp", "CWE-89", '''#include <sqlite3.h>
#include <string>

int {fn}(sqlite3 *db, const std::string &{var}) {{
    std::string sql = "SELECT * FROM {table} WHERE name = '" + {var} + "'";
    return sqlite3_exec(db, sql.c_str(), nullptr, nullptr, nullptr);
}}
''', '''#include <sqlite3.h>
#include <string>

int {fn}(sqlite3 *db, const std::string &{var}) {{
    sqlite3_stmt *stmt;
    sqlite3_prepare_v2(db, "SELECT * FROM {table} WHERE name = ?", -1, &stmt, nullptr);
    sqlite3_bind_text(stmt, 1, {var}.c_str(), -1, SQLITE_TRANSIENT);
    int rc = sqlite3_step(stmt);
    sqlite3_finalize(stmt);
    return rc;
}}
'''),
    Case("cpp", "CWE-78", '''#include <cstdlib>
#include <string>

void {fn}(const std::string &{var}) {{
    std::string cmd = "convert " + {var} + " out.png";
    std::system(cmd.c_str());
}}
''', '''#include <unistd.h>
#include <string>

void {fn}(const std::string &{var}) {{
    if (fork() == 0) execlp("convert", "convert", {var}.c_str(), "out.png", (char *)nullptr);
}}
'''),
    # --- JavaScript ---------------------------------------------------------------------------------------
    Case("javascript", "CWE-78", '''const {{ exec }} = require("child_process");

function {fn}({var}) {{
  exec("git clone " + {var}, (err, out) => console.log(out));
}}
''', '''const {{ execFile }} = require("child_process");

function {fn}({var}) {{
  execFile("git", ["clone", "--", {var}], (err, out) => console.log(out));
}}
'''),
    Case("javascript", "CWE-89", '''async function {fn}(db, {var}) {{
  return db.query(`SELECT * FROM {table} WHERE id = ${{{var}}}`);
}}
''', '''async function {fn}(db, {var}) {{
  return db.query("SELECT * FROM {table} WHERE id = $1", [{var}]);
}}
'''),
    Case("javascript", "CWE-95", '''function {fn}(req, res) {{
  const result = eval(req.body.expression);
  res.json({{ result }});
}}
''', '''function {fn}(req, res) {{
  const result = JSON.parse(req.body.expression);
  res.json({{ result }});
}}
'''),
    Case("javascript", "CWE-328", '''const crypto = require("crypto");

function {fn}(password) {{
  return crypto.createHash("md5").update(password).digest("hex");
}}
''', '''const crypto = require("crypto");

function {fn}(password, salt) {{
  return crypto.scryptSync(password, salt, 64).toString("hex");
}}
'''),
    Case("javascript", "CWE-295", '''const https = require("https");

function {fn}(host) {{
  return https.request({{ host, port: 443, rejectUnauthorized: false }});
}}
''', '''const https = require("https");

function {fn}(host) {{
  return https.request({{ host, port: 443 }});
}}
'''),
    Case("javascript", "CWE-22", '''const fs = require("fs");
const express = require("express");
const app = express();

app.get("/download", (req, res) => {{
  const data = fs.readFileSync("/srv/files/" + req.query.{var});
  res.send(data);
}});
''', '''const fs = require("fs");
const path = require("path");
const express = require("express");
const app = express();

app.get("/download", (req, res) => {{
  const data = fs.readFileSync(path.join("/srv/files", path.basename(req.query.{var})));
  res.send(data);
}});
'''),
    Case("javascript", "CWE-502", '''const serialize = require("node-serialize");

function {fn}(cookie) {{
  return serialize.unserialize(Buffer.from(cookie, "base64").toString());
}}
''', '''function {fn}(cookie) {{
  return JSON.parse(Buffer.from(cookie, "base64").toString());
}}
'''),
    # --- Java -----------------------------------------------------------------------------------------------
    Case("java", "CWE-89", '''import java.sql.*;

public class {cls} {{
    public ResultSet {fn}(Connection conn, String {var}) throws SQLException {{
        Statement stmt = conn.createStatement();
        return stmt.executeQuery("SELECT * FROM {table} WHERE name = '" + {var} + "'");
    }}
}}
''', '''import java.sql.*;

public class {cls} {{
    public ResultSet {fn}(Connection conn, String {var}) throws SQLException {{
        PreparedStatement stmt = conn.prepareStatement("SELECT * FROM {table} WHERE name = ?");
        stmt.setString(1, {var});
        return stmt.executeQuery();
    }}
}}
'''),
    Case("java", "CWE-78", '''import java.io.IOException;

public class {cls} {{
    public Process {fn}(String {var}) throws IOException {{
        return Runtime.getRuntime().exec("ping -c 1 " + {var});
    }}
}}
''', '''import java.io.IOException;

public class {cls} {{
    public Process {fn}(String {var}) throws IOException {{
        return new ProcessBuilder("ping", "-c", "1", {var}).start();
    }}
}}
'''),
    Case("java", "CWE-328", '''import java.security.MessageDigest;

public class {cls} {{
    public byte[] {fn}(byte[] data) throws Exception {{
        return MessageDigest.getInstance("MD5").digest(data);
    }}
}}
''', '''import java.security.MessageDigest;

public class {cls} {{
    public byte[] {fn}(byte[] data) throws Exception {{
        return MessageDigest.getInstance("SHA-256").digest(data);
    }}
}}
'''),
    Case("java", "CWE-327", '''import javax.crypto.Cipher;
import javax.crypto.SecretKey;

public class {cls} {{
    public byte[] {fn}(SecretKey key, byte[] data) throws Exception {{
        Cipher cipher = Cipher.getInstance("AES/ECB/PKCS5Padding");
        cipher.init(Cipher.ENCRYPT_MODE, key);
        return cipher.doFinal(data);
    }}
}}
''', '''import javax.crypto.Cipher;
import javax.crypto.SecretKey;

public class {cls} {{
    public byte[] {fn}(SecretKey key, byte[] data) throws Exception {{
        Cipher cipher = Cipher.getInstance("AES/GCM/NoPadding");
        cipher.init(Cipher.ENCRYPT_MODE, key);
        return cipher.doFinal(data);
    }}
}}
'''),
    Case("java", "CWE-502", '''import java.io.*;

public class {cls} {{
    public Object {fn}(InputStream in) throws Exception {{
        ObjectInputStream ois = new ObjectInputStream(in);
        return ois.readObject();
    }}
}}
''', '''import java.io.*;
import com.fasterxml.jackson.databind.ObjectMapper;

public class {cls} {{
    public Object {fn}(InputStream in) throws Exception {{
        return new ObjectMapper().readValue(in, Order.class);
    }}
}}
'''),
    Case("java", "CWE-295", '''import javax.net.ssl.*;

public class {cls} {{
    public void {fn}(HttpsURLConnection conn) {{
        conn.setHostnameVerifier((hostname, session) -> true);
    }}
}}
''', '''import javax.net.ssl.*;

public class {cls} {{
    public void {fn}(HttpsURLConnection conn) {{
        conn.setHostnameVerifier(HttpsURLConnection.getDefaultHostnameVerifier());
    }}
}}
'''),
    Case("java", "CWE-22", '''import java.io.*;
import javax.servlet.http.*;

public class {cls} extends HttpServlet {{
    protected void doGet(HttpServletRequest request, HttpServletResponse response) throws IOException {{
        String name = request.getParameter("{var}");
        File file = new File("/srv/reports/" + name);
        response.getOutputStream().write(java.nio.file.Files.readAllBytes(file.toPath()));
    }}
}}
''', '''import java.io.*;
import javax.servlet.http.*;
import org.apache.commons.io.FilenameUtils;

public class {cls} extends HttpServlet {{
    protected void doGet(HttpServletRequest request, HttpServletResponse response) throws IOException {{
        String name = FilenameUtils.getName(request.getParameter("{var}"));
        File file = new File("/srv/reports/" + name);
        response.getOutputStream().write(java.nio.file.Files.readAllBytes(file.toPath()));
    }}
}}
'''),
    # --- shell ----------------------------------------------------------------------------------------------
    Case("shell", "CWE-295", '''#!/bin/bash
set -e
curl -k -o /opt/{var}.tar.gz https://releases.example.com/{var}.tar.gz
''', '''#!/bin/bash
set -e
curl -fsSL -o /opt/{var}.tar.gz https://releases.example.com/{var}.tar.gz
'''),
    Case("shell", "CWE-494", '''#!/bin/sh
curl -fsSL https://get.example.com/install.sh | sudo bash
''', '''#!/bin/sh
curl -fsSL -o install.sh https://get.example.com/install.sh
echo "3f1e2d...  install.sh" | sha256sum -c - && sudo bash install.sh
'''),
    Case("shell", "CWE-732", '''#!/bin/bash
mkdir -p /srv/{var}
chmod -R 777 /srv/{var}
''', '''#!/bin/bash
mkdir -p /srv/{var}
chmod -R 750 /srv/{var}
'''),
    Case("shell", "CWE-20", '''#!/bin/bash
{upper}_DIR=$1
rm -rf ${upper}_DIR/
''', '''#!/bin/bash
{upper}_DIR=$1
rm -rf "${{{upper}_DIR:?}}/"
'''),
    Case("shell", "CWE-89", '''#!/bin/bash
user=$1
mysql -u app -e "SELECT * FROM {table} WHERE name = '$user'" shop
''', '''#!/bin/bash
user=$1
mysql -u app shop <<< "SET @u = $(printf '%q' "$user"); SELECT * FROM {table} WHERE name = @u;"
'''),
    Case("shell", "CWE-95", '''#!/bin/bash
cmd=$1
eval "$cmd --verbose"
''', '''#!/bin/bash
cmd=$1
"$cmd" --verbose
'''),
]

# --- cases written with @name@ placeholders, one per rule that the snippets above leave out ---------------------
CASES += [
    # Python
    _case("python", "CWE-377", "python-insecure-tempfile", '''import tempfile

def @fn@(data):
    path = tempfile.mktemp(suffix=".json")
    with open(path, "w") as fh:
        fh.write(data)
    return path
''', '''import tempfile

def @fn@(data):
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as fh:
        fh.write(data)
    return fh.name
'''),
    _case("python", "CWE-489", "python-debug-server", '''from flask import Flask

app = Flask(__name__)

if __name__ == "__main__":
    app.run(host="0.0.0.0", port=8080, debug=True)
''', '''import os
from flask import Flask

app = Flask(__name__)

if __name__ == "__main__":
    app.run(host="0.0.0.0", port=8080, debug=os.environ.get("FLASK_DEBUG") == "1")
'''),
    _case("python", "CWE-338", "python-insecure-random-secret", '''import random
import string

def @fn@():
    reset_token = "".join(random.choice(string.ascii_letters + string.digits) for _ in range(32))
    return reset_token
''', '''import secrets
import string

def @fn@():
    reset_token = "".join(secrets.choice(string.ascii_letters + string.digits) for _ in range(32))
    return reset_token
'''),
    _case("python", "CWE-326", "python-weak-tls", '''import socket
import ssl

def @fn@(host):
    context = ssl.SSLContext(ssl.PROTOCOL_TLSv1)
    return context.wrap_socket(socket.create_connection((host, 443)), server_hostname=host)
''', '''import socket
import ssl

def @fn@(host):
    context = ssl.create_default_context()
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context.wrap_socket(socket.create_connection((host, 443)), server_hostname=host)
'''),
    _case("python", "CWE-611", "python-xxe", '''from lxml import etree

def @fn@(xml_bytes):
    parser = etree.XMLParser(resolve_entities=True)
    return etree.fromstring(xml_bytes, parser)
''', '''from lxml import etree

def @fn@(xml_bytes):
    parser = etree.XMLParser(resolve_entities=False, no_network=True)
    return etree.fromstring(xml_bytes, parser)
'''),
    _case("python", "CWE-321", "python-hardcoded-crypto-key", '''from Crypto.Cipher import AES

def @fn@(data):
    cipher = AES.new(b"k3y-0f-16-bytes!", AES.MODE_GCM)
    return cipher.nonce, cipher.encrypt_and_digest(data)
''', '''import os
from Crypto.Cipher import AES

def @fn@(data):
    cipher = AES.new(bytes.fromhex(os.environ["DATA_KEY"]), AES.MODE_GCM)
    return cipher.nonce, cipher.encrypt_and_digest(data)
'''),
    _case("python", "CWE-329", "python-fixed-iv", '''from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

def @fn@(key, padded):
    encryptor = Cipher(algorithms.AES(key), modes.CBC(b"\\x00" * 16)).encryptor()
    return encryptor.update(padded) + encryptor.finalize()
''', '''import os
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

def @fn@(key, padded):
    iv = os.urandom(16)
    encryptor = Cipher(algorithms.AES(key), modes.CBC(iv)).encryptor()
    return iv + encryptor.update(padded) + encryptor.finalize()
'''),
    _case("python", "CWE-601", "python-open-redirect", '''from flask import Flask, redirect, request

app = Flask(__name__)

@app.route("/login/done")
def @fn@():
    target = request.args.get("next", "/")
    return redirect(target)
''', '''from flask import Flask, redirect, request, url_for

app = Flask(__name__)

@app.route("/login/done")
def @fn@():
    page = request.args.get("next", "index")
    return redirect(url_for(page if page in ("index", "profile") else "index"))
'''),
    _case("python", "CWE-22", "python-tar-extraction", '''import tarfile

def @fn@(archive, dest):
    with tarfile.open(archive) as tar:
        tar.extractall(dest)
''', '''import tarfile

def @fn@(archive, dest):
    with tarfile.open(archive) as tar:
        tar.extractall(dest, filter="data")
'''),
    _case("python", "CWE-79", "python-template-autoescape-off", '''from jinja2 import Environment, FileSystemLoader

def @fn@(name):
    env = Environment(loader=FileSystemLoader("templates"), autoescape=False)
    return env.get_template("hello.html").render(name=name)
''', '''from jinja2 import Environment, FileSystemLoader, select_autoescape

def @fn@(name):
    env = Environment(loader=FileSystemLoader("templates"), autoescape=select_autoescape())
    return env.get_template("hello.html").render(name=name)
'''),
    _case("python", "CWE-319", "python-cleartext-http", '''import requests

def @fn@(@var@):
    return requests.post("http://billing.example.com/api/charge", json={"id": @var@}, timeout=10).json()
''', '''import requests

def @fn@(@var@):
    return requests.post("https://billing.example.com/api/charge", json={"id": @var@}, timeout=10).json()
'''),
    _case("python", "CWE-89", "python-sql-injection", '''def @fn@(conn, @var@):
    sql = "UPDATE @table@ SET seen = 1 WHERE owner = '{}'".format(@var@)
    cur = conn.cursor()
    cur.executemany(sql, [()])
''', '''def @fn@(conn, @var@):
    ids = list(@var@)
    marks = ", ".join("?" * len(ids))
    cur = conn.cursor()
    cur.execute(f"UPDATE @table@ SET seen = 1 WHERE owner IN ({marks})", ids)
'''),
    _case("python", "CWE-78", "python-command-injection", '''import subprocess

def @fn@(@var@):
    return subprocess.getoutput("du -sh " + @var@)
''', '''import subprocess

def @fn@(@var@):
    subprocess.run("sync", shell=True, check=True)
    return subprocess.run(["du", "-sh", @var@], capture_output=True, text=True).stdout
'''),
    _case("python", "CWE-798", "secret-cloud-token", '''import boto3

def @fn@():
    return boto3.client("s3", aws_access_key_id="AKIAQWERTYUIOPASDFGH", region_name="eu-west-1")
''', '''import boto3

def @fn@():
    return boto3.client("s3", region_name="eu-west-1")  # credentials from the environment or the instance role
'''),
    # C and C++
    _case("c", "CWE-338", "c-weak-random", '''#include <stdlib.h>

void @fn@(char *session_id, size_t n) {
    static const char alphabet[] = "abcdefghijklmnopqrstuvwxyz0123456789";
    for (size_t i = 0; i + 1 < n; i++)
        session_id[i] = alphabet[rand() % (sizeof(alphabet) - 1)];
    session_id[n - 1] = '\\0';
}
''', '''#include <stdlib.h>
#include <sys/random.h>

void @fn@(char *session_id, size_t n) {
    static const char alphabet[] = "abcdefghijklmnopqrstuvwxyz0123456789";
    unsigned char bytes[256];
    getrandom(bytes, n, 0);
    for (size_t i = 0; i + 1 < n; i++)
        session_id[i] = alphabet[bytes[i] % (sizeof(alphabet) - 1)];
    session_id[n - 1] = '\\0';
}
'''),
    _case("c", "CWE-377", "c-insecure-tempfile", '''#include <stdio.h>

FILE *@fn@(void) {
    char *name = tmpnam(NULL);
    return fopen(name, "w+");
}
''', '''#include <stdio.h>
#include <stdlib.h>

FILE *@fn@(void) {
    char name[] = "/tmp/@fn@-XXXXXX";
    int fd = mkstemp(name);
    return fd < 0 ? NULL : fdopen(fd, "w+");
}
'''),
    _case("c", "CWE-590", "c-invalid-free", '''#include <stdlib.h>
#include <string.h>

void @fn@(const char *@var@) {
    char copy[128];
    strncpy(copy, @var@, sizeof(copy) - 1);
    copy[sizeof(copy) - 1] = '\\0';
    free(copy);
}
''', '''#include <stdlib.h>
#include <string.h>

void @fn@(const char *@var@) {
    char *copy = strdup(@var@);
    if (copy == NULL)
        return;
    free(copy);
}
'''),
    _case("c", "CWE-121", "c-stack-buffer-copy", '''#include <string.h>

int @fn@(const unsigned char *packet, size_t len) {
    unsigned char payload[256];
    memcpy(payload, packet + 4, len);
    return payload[0];
}
''', '''#include <string.h>

int @fn@(const unsigned char *packet, size_t len) {
    unsigned char payload[256];
    if (len > sizeof(payload))
        return -1;
    memcpy(payload, packet + 4, len);
    return payload[0];
}
'''),
    _case("c", "CWE-680", "c-alloc-size-overflow", '''#include <stdlib.h>

struct point { double x, y; };

struct point *@fn@(size_t count) {
    struct point *points = malloc(count * sizeof(struct point));
    return points;
}
''', '''#include <stdlib.h>

struct point { double x, y; };

struct point *@fn@(size_t count) {
    struct point *points = calloc(count, sizeof(struct point));
    return points;
}
'''),
    _case("c", "CWE-119", "c-snprintf-result-unchecked", '''#include <stdio.h>

void @fn@(char *line, size_t size, const char *@var@, int code) {
    int used = snprintf(line, size, "%s: ", @var@);
    snprintf(line + used, size - used, "%d\\n", code);
}
''', '''#include <stdio.h>

void @fn@(char *line, size_t size, const char *@var@, int code) {
    int used = snprintf(line, size, "%s: ", @var@);
    if (used < 0 || (size_t) used >= size)
        return;
    snprintf(line + used, size - used, "%d\\n", code);
}
'''),
    _case("c", "CWE-120", "c-unbounded-scanf", '''#include <stdio.h>

int main(void) {
    char @var@[32];
    if (scanf("%s", @var@) != 1)
        return 1;
    printf("hello %s\\n", @var@);
    return 0;
}
''', '''#include <stdio.h>

int main(void) {
    char @var@[32];
    if (scanf("%31s", @var@) != 1)
        return 1;
    printf("hello %s\\n", @var@);
    return 0;
}
'''),
    _case("c", "CWE-326", "c-weak-tls", '''#include <openssl/ssl.h>

SSL_CTX *@fn@(void) {
    SSL_CTX *ctx = SSL_CTX_new(TLS_client_method());
    SSL_CTX_set_min_proto_version(ctx, TLS1_VERSION);
    return ctx;
}
''', '''#include <openssl/ssl.h>

SSL_CTX *@fn@(void) {
    SSL_CTX *ctx = SSL_CTX_new(TLS_client_method());
    SSL_CTX_set_min_proto_version(ctx, TLS1_2_VERSION);
    return ctx;
}
'''),
    _case("c", "CWE-611", "c-xxe", '''#include <libxml/parser.h>

xmlDocPtr @fn@(const char *buf, int len) {
    return xmlReadMemory(buf, len, "upload.xml", NULL, XML_PARSE_NOENT | XML_PARSE_NONET);
}
''', '''#include <libxml/parser.h>

xmlDocPtr @fn@(const char *buf, int len) {
    return xmlReadMemory(buf, len, "upload.xml", NULL, XML_PARSE_NONET);
}
'''),
    _case("cpp", "CWE-321", "c-hardcoded-crypto-key", '''#include <openssl/evp.h>
#include <string>

bool @fn@(EVP_CIPHER_CTX *ctx, const unsigned char *iv) {
    return EVP_EncryptInit_ex(ctx, EVP_aes_256_gcm(), nullptr,
                              (const unsigned char *) "an-embedded-32-byte-secret-key!!", iv) == 1;
}
''', '''#include <openssl/evp.h>
#include <string>

bool @fn@(EVP_CIPHER_CTX *ctx, const std::string &key, const unsigned char *iv) {
    return EVP_EncryptInit_ex(ctx, EVP_aes_256_gcm(), nullptr,
                              (const unsigned char *) key.data(), iv) == 1;
}
'''),
    # Java
    _case("java", "CWE-338", "java-weak-random", '''import java.util.Random;

public class @cls@ {
    public String newSessionToken() {
        Random random = new Random();
        return Long.toHexString(random.nextLong());
    }
}
''', '''import java.security.SecureRandom;

public class @cls@ {
    public String newSessionToken() {
        SecureRandom random = new SecureRandom();
        return Long.toHexString(random.nextLong());
    }
}
'''),
    _case("java", "CWE-780", "java-rsa-without-oaep", '''import java.security.PublicKey;
import javax.crypto.Cipher;

public class @cls@ {
    public byte[] @fn@(PublicKey key, byte[] data) throws Exception {
        Cipher cipher = Cipher.getInstance("RSA/ECB/PKCS1Padding");
        cipher.init(Cipher.ENCRYPT_MODE, key);
        return cipher.doFinal(data);
    }
}
''', '''import java.security.PublicKey;
import javax.crypto.Cipher;

public class @cls@ {
    public byte[] @fn@(PublicKey key, byte[] data) throws Exception {
        Cipher cipher = Cipher.getInstance("RSA/ECB/OAEPWithSHA-256AndMGF1Padding");
        cipher.init(Cipher.ENCRYPT_MODE, key);
        return cipher.doFinal(data);
    }
}
'''),
    _case("java", "CWE-611", "java-xxe", '''import java.io.InputStream;
import javax.xml.parsers.DocumentBuilderFactory;
import org.w3c.dom.Document;

public class @cls@ {
    public Document @fn@(InputStream in) throws Exception {
        DocumentBuilderFactory factory = DocumentBuilderFactory.newInstance();
        return factory.newDocumentBuilder().parse(in);
    }
}
''', '''import java.io.InputStream;
import javax.xml.parsers.DocumentBuilderFactory;
import org.w3c.dom.Document;

public class @cls@ {
    public Document @fn@(InputStream in) throws Exception {
        DocumentBuilderFactory factory = DocumentBuilderFactory.newInstance();
        factory.setFeature("http://apache.org/xml/features/disallow-doctype-decl", true);
        return factory.newDocumentBuilder().parse(in);
    }
}
'''),
    _case("java", "CWE-326", "java-weak-tls", '''import javax.net.ssl.SSLContext;

public class @cls@ {
    public SSLContext @fn@() throws Exception {
        SSLContext context = SSLContext.getInstance("TLSv1");
        context.init(null, null, null);
        return context;
    }
}
''', '''import javax.net.ssl.SSLContext;

public class @cls@ {
    public SSLContext @fn@() throws Exception {
        SSLContext context = SSLContext.getInstance("TLSv1.3");
        context.init(null, null, null);
        return context;
    }
}
'''),
    _case("java", "CWE-321", "java-hardcoded-crypto-key", '''import javax.crypto.Cipher;
import javax.crypto.spec.SecretKeySpec;

public class @cls@ {
    public Cipher @fn@() throws Exception {
        SecretKeySpec key = new SecretKeySpec("0123456789abcdef".getBytes("UTF-8"), "AES");
        Cipher cipher = Cipher.getInstance("AES/GCM/NoPadding");
        cipher.init(Cipher.ENCRYPT_MODE, key);
        return cipher;
    }
}
''', '''import java.util.Base64;
import javax.crypto.Cipher;
import javax.crypto.spec.SecretKeySpec;

public class @cls@ {
    public Cipher @fn@() throws Exception {
        SecretKeySpec key = new SecretKeySpec(Base64.getDecoder().decode(System.getenv("DATA_KEY")), "AES");
        Cipher cipher = Cipher.getInstance("AES/GCM/NoPadding");
        cipher.init(Cipher.ENCRYPT_MODE, key);
        return cipher;
    }
}
'''),
    _case("java", "CWE-329", "java-fixed-iv", '''import javax.crypto.Cipher;
import javax.crypto.SecretKey;
import javax.crypto.spec.IvParameterSpec;

public class @cls@ {
    public byte[] @fn@(SecretKey key, byte[] data) throws Exception {
        Cipher cipher = Cipher.getInstance("AES/CBC/PKCS5Padding");
        cipher.init(Cipher.ENCRYPT_MODE, key, new IvParameterSpec(new byte[16]));
        return cipher.doFinal(data);
    }
}
''', '''import java.security.SecureRandom;
import javax.crypto.Cipher;
import javax.crypto.SecretKey;
import javax.crypto.spec.IvParameterSpec;

public class @cls@ {
    public byte[] @fn@(SecretKey key, byte[] data, byte[] iv) throws Exception {
        new SecureRandom().nextBytes(iv);
        Cipher cipher = Cipher.getInstance("AES/CBC/PKCS5Padding");
        cipher.init(Cipher.ENCRYPT_MODE, key, new IvParameterSpec(iv));
        return cipher.doFinal(data);
    }
}
'''),
    _case("java", "CWE-601", "java-open-redirect", '''import javax.servlet.http.*;

public class @cls@ extends HttpServlet {
    protected void doGet(HttpServletRequest request, HttpServletResponse response) throws java.io.IOException {
        String target = request.getParameter("next");
        response.sendRedirect(target);
    }
}
''', '''import javax.servlet.http.*;

public class @cls@ extends HttpServlet {
    protected void doGet(HttpServletRequest request, HttpServletResponse response) throws java.io.IOException {
        String target = request.getParameter("next");
        response.sendRedirect("/account".equals(target) ? "/account" : "/");
    }
}
'''),
    _case("java", "CWE-79", "java-servlet-xss", '''import javax.servlet.http.*;

public class @cls@ extends HttpServlet {
    protected void doGet(HttpServletRequest request, HttpServletResponse response) throws java.io.IOException {
        String @var@ = request.getParameter("q");
        response.getWriter().println("<p>Results for " + @var@ + "</p>");
    }
}
''', '''import javax.servlet.http.*;
import org.owasp.encoder.Encode;

public class @cls@ extends HttpServlet {
    protected void doGet(HttpServletRequest request, HttpServletResponse response) throws java.io.IOException {
        String @var@ = request.getParameter("q");
        response.getWriter().println("<p>Results for " + Encode.forHtml(@var@) + "</p>");
    }
}
'''),
    _case("java", "CWE-319", "java-cleartext-http", '''import java.net.HttpURLConnection;
import java.net.URL;

public class @cls@ {
    public int @fn@() throws Exception {
        HttpURLConnection connection = (HttpURLConnection) new URL("http://payments.example.com/status").openConnection();
        return connection.getResponseCode();
    }
}
''', '''import java.net.HttpURLConnection;
import java.net.URL;

public class @cls@ {
    public int @fn@() throws Exception {
        HttpURLConnection connection = (HttpURLConnection) new URL("https://payments.example.com/status").openConnection();
        return connection.getResponseCode();
    }
}
'''),
    # JavaScript
    _case("javascript", "CWE-95", "js-string-timer", '''function @fn@(@var@) {
  const code = "notify('" + @var@ + "')";
  setTimeout(code, 500);
}
''', '''function @fn@(@var@) {
  setTimeout(() => notify(@var@), 500);
}
'''),
    _case("javascript", "CWE-327", "js-weak-cipher", '''const crypto = require("crypto");

function @fn@(key, iv, text) {
  const cipher = crypto.createCipheriv("des-ede3-cbc", key, iv);
  return Buffer.concat([cipher.update(text, "utf8"), cipher.final()]);
}
''', '''const crypto = require("crypto");

function @fn@(key, iv, text) {
  const cipher = crypto.createCipheriv("aes-256-gcm", key, iv);
  return Buffer.concat([cipher.update(text, "utf8"), cipher.final(), cipher.getAuthTag()]);
}
'''),
    _case("javascript", "CWE-78", "js-spawn-untrusted-program", '''const { spawn } = require("child_process");

function @fn@(tool, @var@) {
  return spawn(tool, ["--check", @var@]);
}
''', '''const { spawn } = require("child_process");

function @fn@(tool, @var@) {
  const program = tool === "lint" ? "eslint" : "prettier";
  return spawn(program, ["--check", @var@]);
}
'''),
    _case("javascript", "CWE-346", "js-unchecked-message-origin", '''window.addEventListener("message", (event) => {
  document.getElementById("@var@").textContent = event.data.text;
});
''', '''window.addEventListener("message", (event) => {
  if (event.origin !== "https://widgets.example.com") {
    return;
  }
  document.getElementById("@var@").textContent = event.data.text;
});
'''),
    _case("javascript", "CWE-345", "js-postmessage-any-origin", '''function @fn@(frame, @var@) {
  frame.contentWindow.postMessage({ type: "session", value: @var@ }, "*");
}
''', '''function @fn@(frame, @var@) {
  frame.contentWindow.postMessage({ type: "session", value: @var@ }, "https://widgets.example.com");
}
'''),
    _case("javascript", "CWE-319", "js-cleartext-http", '''async function @fn@(@var@) {
  const response = await fetch("http://api.example.com/v2/items/" + encodeURIComponent(@var@));
  return response.json();
}
''', '''async function @fn@(@var@) {
  const response = await fetch("https://api.example.com/v2/items/" + encodeURIComponent(@var@));
  return response.json();
}
'''),
    _case("javascript", "CWE-79", "js-dom-xss", '''function @fn@(@var@) {
  const list = document.getElementById("results");
  list.innerHTML = `<li>${@var@.title}</li>`;
}
''', '''function @fn@(@var@) {
  const list = document.getElementById("results");
  const item = document.createElement("li");
  item.textContent = @var@.title;
  list.replaceChildren(item);
}
'''),
    _case("javascript", "CWE-338", "js-insecure-random-secret", '''function @fn@() {
  const apiKey = Math.random().toString(36).slice(2) + Math.random().toString(36).slice(2);
  return apiKey;
}
''', '''const crypto = require("crypto");

function @fn@() {
  const apiKey = crypto.randomBytes(24).toString("base64url");
  return apiKey;
}
'''),
    _case("javascript", "CWE-601", "js-open-redirect", '''const express = require("express");
const app = express();

app.get("/continue", (req, res) => {
  res.redirect(req.query.@var@);
});
''', '''const express = require("express");
const app = express();

app.get("/continue", (req, res) => {
  const target = req.query.@var@;
  res.redirect(typeof target === "string" && /^\\/[a-z]/.test(target) ? "/home" : "/");
});
'''),
    _case("javascript", "CWE-326", "js-weak-tls", '''const https = require("https");

function @fn@(host) {
  return https.request({ host, port: 443, secureProtocol: "TLSv1_method" });
}
''', '''const https = require("https");

function @fn@(host) {
  return https.request({ host, port: 443, minVersion: "TLSv1.2" });
}
'''),
    _case("javascript", "CWE-611", "js-xxe", '''const libxmljs = require("libxmljs");

function @fn@(req) {
  return libxmljs.parseXml(req.body, { noent: true });
}
''', '''const libxmljs = require("libxmljs");

function @fn@(req) {
  return libxmljs.parseXml(req.body, { noent: false, nonet: true });
}
'''),
    _case("javascript", "CWE-798", "js-hardcoded-jwt-secret", '''const jwt = require("jsonwebtoken");

function @fn@(user) {
  return jwt.sign({ sub: user.id }, "change-me-jwt-signing", { expiresIn: "1h" });
}
''', '''const jwt = require("jsonwebtoken");

function @fn@(user) {
  return jwt.sign({ sub: user.id }, process.env.JWT_SIGNING_KEY, { expiresIn: "1h" });
}
'''),
    # shell
    _case("shell", "CWE-327", "shell-weak-crypto", '''#!/bin/bash
openssl enc -des-ede3-cbc -salt -in /srv/@var@.db -out /backup/@var@.enc -pass file:/etc/backup.key
''', '''#!/bin/bash
openssl enc -aes-256-cbc -pbkdf2 -salt -in /srv/@var@.db -out /backup/@var@.enc -pass file:/etc/backup.key
'''),
    _case("shell", "CWE-377", "shell-predictable-tempfile", '''#!/bin/bash
ps aux > /tmp/@var@.txt
sort -k3 -nr /tmp/@var@.txt | head
''', '''#!/bin/bash
out=$(mktemp)
ps aux > "$out"
sort -k3 -nr "$out" | head
'''),
    _case("shell", "CWE-295", "shell-ssh-host-key-unchecked", '''#!/bin/bash
rsync -az -e "ssh -o StrictHostKeyChecking=no" ./dist/ deploy@@var@.example.com:/srv/app/
''', '''#!/bin/bash
rsync -az -e "ssh -o StrictHostKeyChecking=yes" ./dist/ deploy@@var@.example.com:/srv/app/
'''),
    _case("shell", "CWE-798", "shell-password-on-command-line", '''#!/bin/bash
mysqldump -u backup -pS3cretBackup shop > /backup/@var@.sql
''', '''#!/bin/bash
mysqldump --defaults-extra-file=/etc/backup/my.cnf -u backup shop > /backup/@var@.sql
'''),
    _case("shell", "CWE-326", "shell-weak-tls", '''#!/bin/bash
curl --tlsv1.0 -fsSL -o /opt/@var@.tgz https://mirror.example.com/@var@.tgz
''', '''#!/bin/bash
curl --tlsv1.2 -fsSL -o /opt/@var@.tgz https://mirror.example.com/@var@.tgz
'''),
    _case("shell", "CWE-78", "shell-command-injection", '''#!/bin/bash
file=$1
su -s /bin/sh nobody -c "gzip -9 $file"
sh -c "gzip -9 $file"
''', '''#!/bin/bash
file=$1
sh -c 'gzip -9 "$1"' _ "$file"
'''),
    _case("shell", "CWE-798", "secret-private-key", '''#!/bin/bash
cat > ~/.ssh/id_rsa <<'KEY'
-----BEGIN OPENSSH PRIVATE KEY-----
b3BlbnNzaC1rZXktdjEAAAAABG5vbmUAAAAEbm9uZQAAAAAAAAABAAAAMwAAAAtzc2gtZW
-----END OPENSSH PRIVATE KEY-----
KEY
''', '''#!/bin/bash
install -m 600 /run/secrets/deploy_key ~/.ssh/id_rsa
'''),
    # permissions, host keys, token signatures, templates, races, CSRF, regular expressions
    _case("python", "CWE-732", "python-world-writable", '''import os

def @fn@(path, data):
    with open(path, "w") as fh:
        fh.write(data)
    os.chmod(path, 0o666)
''', '''import os

def @fn@(path, data):
    with open(path, "w") as fh:
        fh.write(data)
    os.chmod(path, 0o640)
'''),
    _case("python", "CWE-295", "python-ssh-host-key-unchecked", '''import paramiko

def @fn@(host, cmd):
    client = paramiko.SSHClient()
    client.set_missing_host_key_policy(paramiko.AutoAddPolicy())
    client.connect(host, username="deploy")
    return client.exec_command(cmd)
''', '''import paramiko

def @fn@(host, cmd):
    client = paramiko.SSHClient()
    client.load_system_host_keys()
    client.set_missing_host_key_policy(paramiko.RejectPolicy())
    client.connect(host, username="deploy")
    return client.exec_command(cmd)
'''),
    _case("python", "CWE-347", "python-jwt-unverified", '''import jwt

def @fn@(token):
    claims = jwt.decode(token, options={"verify_signature": False})
    return claims["sub"]
''', '''import jwt

def @fn@(token, public_key):
    claims = jwt.decode(token, public_key, algorithms=["RS256"])
    return claims["sub"]
'''),
    _case("python", "CWE-1336", "python-template-injection", '''from flask import Flask, request, render_template_string

app = Flask(__name__)

@app.route("/hello")
def @fn@():
    name = request.args.get("name", "world")
    return render_template_string("<h1>Hello " + name + "</h1>")
''', '''from flask import Flask, request, render_template_string

app = Flask(__name__)

@app.route("/hello")
def @fn@():
    name = request.args.get("name", "world")
    return render_template_string("<h1>Hello {{ name }}</h1>", name=name)
'''),
    _case("c", "CWE-732", "c-world-writable", '''#include <fcntl.h>
#include <unistd.h>

int @fn@(const char *path) {
    return open(path, O_WRONLY | O_CREAT | O_TRUNC, 0666);
}
''', '''#include <fcntl.h>
#include <unistd.h>

int @fn@(const char *path) {
    return open(path, O_WRONLY | O_CREAT | O_TRUNC, 0640);
}
'''),
    _case("c", "CWE-367", "c-toctou", '''#include <stdio.h>
#include <unistd.h>

FILE *@fn@(const char *path) {
    if (access(path, W_OK) != 0)
        return NULL;
    return fopen(path, "a");
}
''', '''#include <stdio.h>
#include <unistd.h>

FILE *@fn@(const char *path) {
    FILE *fh = fopen(path, "a");
    if (fh == NULL)
        perror(path);
    return fh;
}
'''),
    _case("java", "CWE-352", "java-csrf-disabled", '''import org.springframework.context.annotation.Bean;
import org.springframework.security.config.annotation.web.builders.HttpSecurity;
import org.springframework.security.web.SecurityFilterChain;

public class @cls@ {
    @Bean
    public SecurityFilterChain filterChain(HttpSecurity http) throws Exception {
        http.csrf(csrf -> csrf.disable()).formLogin(form -> form.loginPage("/login"));
        return http.build();
    }
}
''', '''import org.springframework.context.annotation.Bean;
import org.springframework.security.config.annotation.web.builders.HttpSecurity;
import org.springframework.security.web.SecurityFilterChain;

public class @cls@ {
    @Bean
    public SecurityFilterChain filterChain(HttpSecurity http) throws Exception {
        http.formLogin(form -> form.loginPage("/login"));
        return http.build();
    }
}
'''),
    _case("java", "CWE-732", "java-world-writable", '''import java.io.File;

public class @cls@ {
    public void @fn@(File report) {
        report.setReadable(true, false);
        report.setWritable(true, false);
    }
}
''', '''import java.io.File;

public class @cls@ {
    public void @fn@(File report) {
        report.setReadable(true, false);
        report.setWritable(true, true);
    }
}
'''),
    _case("javascript", "CWE-347", "js-jwt-unverified", '''const jwt = require("jsonwebtoken");

function @fn@(token, key) {
  return jwt.verify(token, key, { algorithms: ["HS256", "none"] });
}
''', '''const jwt = require("jsonwebtoken");

function @fn@(token, key) {
  return jwt.verify(token, key, { algorithms: ["HS256"] });
}
'''),
    _case("javascript", "CWE-1333", "js-regexp-injection", '''const express = require("express");
const app = express();

app.get("/search", (req, res) => {
  const pattern = new RegExp(req.query.@var@, "i");
  res.json(items.filter((item) => pattern.test(item.name)));
});
''', '''const express = require("express");
const app = express();

app.get("/search", (req, res) => {
  const needle = String(req.query.@var@).toLowerCase();
  res.json(items.filter((item) => item.name.toLowerCase().includes(needle)));
});
'''),
    _case("javascript", "CWE-732", "js-world-writable", '''const fs = require("fs");

function @fn@(dir) {
  fs.mkdirSync(dir, { recursive: true, mode: 0o777 });
}
''', '''const fs = require("fs");

function @fn@(dir) {
  fs.mkdirSync(dir, { recursive: true, mode: 0o750 });
}
'''),
    # key sizes
    _case("python", "CWE-326", "python-weak-key-size", '''from cryptography.hazmat.primitives.asymmetric import rsa

def @fn@():
    return rsa.generate_private_key(public_exponent=65537, key_size=1024)
''', '''from cryptography.hazmat.primitives.asymmetric import rsa

def @fn@():
    return rsa.generate_private_key(public_exponent=65537, key_size=3072)
'''),
    _case("c", "CWE-326", "c-weak-key-size", '''#include <openssl/evp.h>

int @fn@(EVP_PKEY_CTX *ctx, EVP_PKEY **key) {
    if (EVP_PKEY_keygen_init(ctx) <= 0 || EVP_PKEY_CTX_set_rsa_keygen_bits(ctx, 1024) <= 0)
        return 0;
    return EVP_PKEY_keygen(ctx, key) > 0;
}
''', '''#include <openssl/evp.h>

int @fn@(EVP_PKEY_CTX *ctx, EVP_PKEY **key) {
    if (EVP_PKEY_keygen_init(ctx) <= 0 || EVP_PKEY_CTX_set_rsa_keygen_bits(ctx, 3072) <= 0)
        return 0;
    return EVP_PKEY_keygen(ctx, key) > 0;
}
'''),
    _case("java", "CWE-326", "java-weak-key-size", '''import java.security.KeyPair;
import java.security.KeyPairGenerator;

public class @cls@ {
    public KeyPair @fn@() throws Exception {
        KeyPairGenerator generator = KeyPairGenerator.getInstance("RSA");
        generator.initialize(1024);
        return generator.generateKeyPair();
    }
}
''', '''import java.security.KeyPair;
import java.security.KeyPairGenerator;

public class @cls@ {
    public KeyPair @fn@() throws Exception {
        KeyPairGenerator generator = KeyPairGenerator.getInstance("RSA");
        generator.initialize(3072);
        return generator.generateKeyPair();
    }
}
'''),
    _case("javascript", "CWE-326", "js-weak-key-size", '''const crypto = require("crypto");

function @fn@() {
  return crypto.generateKeyPairSync("rsa", { modulusLength: 1024 });
}
''', '''const crypto = require("crypto");

function @fn@() {
  return crypto.generateKeyPairSync("rsa", { modulusLength: 3072 });
}
'''),
    # server-side request forgery, XPath and LDAP injection
    _case("python", "CWE-918", "python-ssrf", '''import requests
from flask import Flask, request

app = Flask(__name__)

@app.route("/preview")
def @fn@():
    url = request.args.get("url")
    return requests.get(url, timeout=5).text
''', '''import requests
from flask import Flask, request

app = Flask(__name__)

@app.route("/preview")
def @fn@():
    query = request.args.get("q")
    return requests.get("https://search.example.com/api", params={"q": query}, timeout=5).text
'''),
    _case("javascript", "CWE-918", "js-ssrf", '''const express = require("express");
const app = express();

app.get("/preview", async (req, res) => {
  const response = await fetch(req.query.@var@);
  res.send(await response.text());
});
''', '''const express = require("express");
const app = express();

app.get("/preview", async (req, res) => {
  const response = await fetch("https://search.example.com/api?q=" + encodeURIComponent(req.query.@var@));
  res.send(await response.text());
});
'''),
    _case("java", "CWE-918", "java-ssrf", '''import java.io.InputStream;
import java.net.URL;
import javax.servlet.http.*;

public class @cls@ extends HttpServlet {
    protected void doGet(HttpServletRequest request, HttpServletResponse response) throws java.io.IOException {
        try (InputStream in = new URL(request.getParameter("feed")).openStream()) {
            in.transferTo(response.getOutputStream());
        }
    }
}
''', '''import java.io.InputStream;
import java.net.URL;
import java.util.Map;
import javax.servlet.http.*;

public class @cls@ extends HttpServlet {
    private static final Map<String, String> FEEDS = Map.of("news", "https://feeds.example.com/news.xml");

    protected void doGet(HttpServletRequest request, HttpServletResponse response) throws java.io.IOException {
        try (InputStream in = new URL(FEEDS.getOrDefault(request.getParameter("feed"), "https://feeds.example.com/all.xml")).openStream()) {
            in.transferTo(response.getOutputStream());
        }
    }
}
'''),
    _case("java", "CWE-643", "java-xpath-injection", '''import javax.servlet.http.*;
import javax.xml.xpath.*;
import org.w3c.dom.Document;

public class @cls@ extends HttpServlet {
    private Document users;

    protected void doGet(HttpServletRequest request, HttpServletResponse response) throws Exception {
        String @var@ = request.getParameter("name");
        XPath xpath = XPathFactory.newInstance().newXPath();
        response.setStatus(xpath.evaluate("//user[name='" + @var@ + "']", users).isEmpty() ? 404 : 200);
    }
}
''', '''import javax.servlet.http.*;
import javax.xml.namespace.QName;
import javax.xml.xpath.*;
import org.w3c.dom.Document;

public class @cls@ extends HttpServlet {
    private Document users;

    protected void doGet(HttpServletRequest request, HttpServletResponse response) throws Exception {
        String @var@ = request.getParameter("name");
        XPath xpath = XPathFactory.newInstance().newXPath();
        xpath.setXPathVariableResolver((QName q) -> @var@);
        response.setStatus(xpath.evaluate("//user[name=$name]", users).isEmpty() ? 404 : 200);
    }
}
'''),
    _case("java", "CWE-90", "java-ldap-injection", '''import javax.naming.directory.*;
import javax.servlet.http.*;

public class @cls@ extends HttpServlet {
    private DirContext ctx;

    protected void doGet(HttpServletRequest request, HttpServletResponse response) throws Exception {
        String @var@ = request.getParameter("uid");
        SearchControls controls = new SearchControls();
        response.setStatus(ctx.search("ou=people,dc=example,dc=com", "(uid=" + @var@ + ")", controls).hasMore() ? 200 : 404);
    }
}
''', '''import javax.naming.directory.*;
import javax.servlet.http.*;

public class @cls@ extends HttpServlet {
    private DirContext ctx;

    protected void doGet(HttpServletRequest request, HttpServletResponse response) throws Exception {
        String @var@ = request.getParameter("uid");
        SearchControls controls = new SearchControls();
        response.setStatus(ctx.search("ou=people,dc=example,dc=com", "(uid={0})", new Object[] {@var@}, controls).hasMore() ? 200 : 404);
    }
}
'''),
    # passwords kept as fast hashes
    _case("python", "CWE-916", "python-fast-password-hash", '''import hashlib
import os

def @fn@(password):
    salt = os.urandom(16)
    return salt, hashlib.sha256(salt + password.encode()).hexdigest()
''', '''import hashlib
import os

def @fn@(password):
    salt = os.urandom(16)
    return salt, hashlib.scrypt(password.encode(), salt=salt, n=2**14, r=8, p=1).hex()
'''),
    _case("javascript", "CWE-916", "js-fast-password-hash", '''const crypto = require("crypto");

function @fn@(user, password) {
  user.passwordHash = crypto.createHash("sha512").update(password).digest("hex");
}
''', '''const crypto = require("crypto");

function @fn@(user, password) {
  const salt = crypto.randomBytes(16);
  user.passwordHash = salt.toString("hex") + ":" + crypto.scryptSync(password, salt, 64).toString("hex");
}
'''),
    _case("java", "CWE-916", "java-fast-password-hash", '''import java.nio.charset.StandardCharsets;
import java.security.MessageDigest;

public class @cls@ {
    public byte[] @fn@(String password) throws Exception {
        MessageDigest digest = MessageDigest.getInstance("SHA-256");
        return digest.digest(password.getBytes(StandardCharsets.UTF_8));
    }
}
''', '''import javax.crypto.SecretKeyFactory;
import javax.crypto.spec.PBEKeySpec;

public class @cls@ {
    public byte[] @fn@(String password, byte[] salt) throws Exception {
        PBEKeySpec spec = new PBEKeySpec(password.toCharArray(), salt, 600000, 256);
        return SecretKeyFactory.getInstance("PBKDF2WithHmacSHA256").generateSecret(spec).getEncoded();
    }
}
'''),
]

_NAMES = ["fetch_report", "load_user", "sync_items", "handle", "process_order", "archive", "lookup", "render_page"]
_VARS = ["name", "user_input", "path", "item", "target", "query_value", "filename", "host_name"]
_TABLES = ["users", "orders", "accounts", "inventory", "sessions"]
_CLASSES = ["ReportService", "UserDao", "Handler", "OrderRepository", "Gateway"]


def variants(seed: int = 0, per_case: int = 1) -> list[tuple[Case, str, str]]:
    """(case, insecure code, fixed code) for each case, `per_case` times with seeded identifier draws."""
    rng = random.Random(seed)
    out = []
    for case in CASES:
        for _ in range(per_case):
            var = rng.choice(_VARS)
            names = {"fn": rng.choice(_NAMES), "var": var, "table": rng.choice(_TABLES), "cls": rng.choice(_CLASSES),
                     "upper": var.upper()}
            out.append((case, case.insecure.format(**names), case.fixed.format(**names)))
    return out
