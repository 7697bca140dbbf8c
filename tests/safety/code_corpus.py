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
