"""A real WordPress for the plugin's tests: Debian's WordPress and MariaDB, private to one test module.

`WordPressSite.start()` lays out, in a directory of its own:
  db/       a MariaDB datadir (mariadb-install-db), served by mariadbd on a loopback port with
            --skip-grant-tables (nothing but this test can reach it; no passwords to manage)
  site/     a copy of /usr/share/wordpress (Debian's wp-config.php looks for /etc/wordpress/config-<host>.php
            and its wp-admin finds wp-load.php through its real path, so a copy is what keeps the system
            untouched), our wp-config.php, and wp-content/ with the plugin symlinked from the repository
  a `php -S` server with a router (permalinks on, so /wp-json/... routes as on a real host)
and installs WordPress with wp_install() from a PHP CLI bootstrap, then activates the plugin.

`php(code)` runs PHP inside the site (wp-load.php) and returns what the code returns, as JSON: tests
use it to call the plugin's API exactly as wp-custom would. A must-use plugin of the test site (not of
the plugin) records the plugin's action hooks to a file and logs a browser in for the admin page.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import subprocess
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from tests.stack import stop_process, wait_for

WORDPRESS = Path("/usr/share/wordpress")
PLUGIN_SLUG = "salestrainer-sidecar"
CALLBACK_PATH = "/wp-json/salestrainer/v1/upload-complete"
ADMIN_PAGE = "/wp-admin/tools.php?page=salestrainer-jobs"
OUTPUT_MARK = "\n@@ST-RESULT@@"

# php -S: a path that names a file (or a directory with an index) is served as is; anything else goes
# to WordPress' front controller, as Apache's .htaccess rules would send it.
ROUTER = """<?php
$path = urldecode( parse_url( $_SERVER['REQUEST_URI'], PHP_URL_PATH ) );
if ( '/' !== $path && file_exists( __DIR__ . $path ) ) {
	return false;
}
$_SERVER['SCRIPT_NAME'] = '/index.php';
require __DIR__ . '/index.php';
"""

# Test harness only, installed as a must-use plugin of the test site.
MU_PLUGIN = """<?php
// Every action the plugin fires, one JSON line each, for the test to count.
foreach ( array( 'salestrainer_transcript_ready', 'salestrainer_transcript_failed' ) as $st_hook ) {
	add_action( $st_hook, function ( $job_id, $detail, $payload ) use ( $st_hook ) {
		$line = json_encode( array( 'hook' => $st_hook, 'job_id' => $job_id, 'detail' => $detail,
			'payload' => $payload ) );
		file_put_contents( ST_TEST_HOOK_LOG, $line . "\\n", FILE_APPEND | LOCK_EX );
	}, 10, 3 );
}
// A site that locks its REST API to logged-in users, with the REST API handbook's own snippet
// (developer.wordpress.org/rest-api/frequently-asked-questions/, "Require Authentication for All
// Requests"); judging the user here also makes core check any Basic credentials (application passwords).
add_filter( 'rest_authentication_errors', function ( $result ) {
	if ( true === $result || is_wp_error( $result ) ) {
		return $result;
	}
	if ( ! is_user_logged_in() ) {
		return new WP_Error( 'rest_not_logged_in', 'You are not currently logged in.', array( 'status' => 401 ) );
	}
	return $result;
} );
// ?st_test_login=<key>: log the browser in as the admin and go to the jobs page.
add_action( 'init', function () {
	if ( ! isset( $_GET['st_test_login'] ) ) {
		return;
	}
	if ( ! hash_equals( ST_TEST_LOGIN_KEY, (string) $_GET['st_test_login'] ) ) {
		status_header( 403 );
		exit;
	}
	wp_set_auth_cookie( get_user_by( 'login', 'admin' )->ID, false );
	wp_safe_redirect( admin_url( 'tools.php?page=salestrainer-jobs' ) );
	exit;
} );
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def php_literal(value: str) -> str:
    """A single-quoted PHP string literal."""
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


class WordPressSite:
    """One WordPress with the plugin active; `constants` go into wp-config.php (the plugin's settings)."""

    def __init__(self, root: Path, plugin_dir: Path, constants: dict[str, str]) -> None:
        self.root = root
        self.plugin_dir = plugin_dir
        self.constants = constants
        self.site = root / "site"
        self.db_dir = root / "db"
        self.hook_log = root / "hooks.jsonl"
        self.debug_log = root / "wp-debug.log"
        self.login_key = secrets.token_hex(16)
        self.db_port = free_port()
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.callback_url = self.url + CALLBACK_PATH
        self.procs: list[subprocess.Popen[bytes]] = []

    # --- lifecycle -------------------------------------------------------------------------------
    def start(self) -> WordPressSite:
        self.hook_log.touch()
        self._start_mariadb()
        self._lay_out_site()
        self._start_php_server()
        self.php("", install=True)
        activated = self.php(f"""
            require_once ABSPATH . 'wp-admin/includes/plugin.php';
            global $wp_rewrite;
            $wp_rewrite->set_permalink_structure( '/%postname%/' );
            flush_rewrite_rules();
            $r = activate_plugin( '{PLUGIN_SLUG}/{PLUGIN_SLUG}.php' );
            return is_wp_error( $r ) ? $r->get_error_message() : is_plugin_active( '{PLUGIN_SLUG}/{PLUGIN_SLUG}.php' );
        """)
        assert activated is True, f"plugin not activated: {activated}"
        return self

    def stop(self) -> None:
        for proc in reversed(self.procs):
            stop_process(proc, grace=15)  # MariaDB flushes its tables on SIGTERM

    def _spawn(self, args: list[str], log: Path, **kwargs: Any) -> subprocess.Popen[bytes]:
        with log.open("ab") as out:
            proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, **kwargs)
        self.procs.append(proc)
        return proc

    def _start_mariadb(self) -> None:
        data = self.db_dir / "data"
        data.mkdir(parents=True)
        user = ["--user=root"] if os.geteuid() == 0 else []  # mariadbd refuses to run as root unless told
        # --no-defaults: nothing from /etc/mysql (a system server's socket, port or datadir) leaks in.
        common = ["--no-defaults", f"--datadir={data}", *user, "--innodb-log-file-size=16M"]
        subprocess.run(["mariadb-install-db", *common, "--auth-root-authentication-method=normal",
                        "--skip-test-db"], check=True, capture_output=True, timeout=120)
        log = self.db_dir / "mariadbd.log"
        proc = self._spawn(["mariadbd", *common, "--bind-address=127.0.0.1", f"--port={self.db_port}",
                            f"--socket={self.db_dir / 'mysqld.sock'}", f"--pid-file={self.db_dir / 'mysqld.pid'}",
                            "--skip-grant-tables", "--skip-name-resolve", "--skip-log-bin",
                            "--innodb-buffer-pool-size=32M", f"--log-error={log}"], self.db_dir / "stdout.log")

        def ready() -> bool:
            if proc.poll() is not None:
                raise AssertionError(f"mariadbd exited: {log.read_text(errors='replace')[-2000:]}")
            r = subprocess.run(["mariadb", "--no-defaults", "-h127.0.0.1", f"-P{self.db_port}", "-uroot",
                                "-e", "CREATE DATABASE IF NOT EXISTS wordpress"], capture_output=True, timeout=10)
            return r.returncode == 0

        wait_for(ready, timeout=60, interval=0.2, what="mariadbd accepting connections")

    def _lay_out_site(self) -> None:
        shutil.copytree(WORDPRESS, self.site, symlinks=True)
        (self.site / "wp-config.php").unlink()
        content = self.site / "wp-content"
        (content / "plugins").mkdir(parents=True, exist_ok=True)
        (content / "plugins" / PLUGIN_SLUG).symlink_to(self.plugin_dir, target_is_directory=True)
        (content / "mu-plugins").mkdir(exist_ok=True)
        (content / "mu-plugins" / "st-test-harness.php").write_text(MU_PLUGIN)
        (self.site / "st-router.php").write_text(ROUTER)
        defines = {
            "DB_NAME": "wordpress", "DB_USER": "root", "DB_PASSWORD": "", "DB_HOST": f"127.0.0.1:{self.db_port}",
            "DB_CHARSET": "utf8mb4", "DB_COLLATE": "", "WP_HOME": self.url, "WP_SITEURL": self.url,
            "WP_CONTENT_DIR": str(content), "WP_CONTENT_URL": self.url + "/wp-content",
            "WP_DEBUG_LOG": str(self.debug_log), "ST_TEST_HOOK_LOG": str(self.hook_log),
            "ST_TEST_LOGIN_KEY": self.login_key,
            **{k: secrets.token_hex(32) for k in ("AUTH_KEY", "SECURE_AUTH_KEY", "LOGGED_IN_KEY", "NONCE_KEY",
                                                  "AUTH_SALT", "SECURE_AUTH_SALT", "LOGGED_IN_SALT", "NONCE_SALT")},
            **self.constants,
        }
        lines = ["<?php"] + [f"define( {php_literal(k)}, {php_literal(v)} );" for k, v in defines.items()]
        lines += [
            "define( 'WP_DEBUG', true );", "define( 'WP_DEBUG_DISPLAY', false );",
            # 'local' turns on application passwords over plain http, so a stray Authorization header
            # is checked by core (and refused) as it would be on an https production site.
            "define( 'WP_ENVIRONMENT_TYPE', 'local' );",
            # No cron, no update checks: this site has no way out but to the local stack.
            "define( 'DISABLE_WP_CRON', true );", "define( 'AUTOMATIC_UPDATER_DISABLED', true );",
            "define( 'WP_HTTP_BLOCK_EXTERNAL', true );",
            "$table_prefix = 'wp_';",
            "if ( ! defined( 'ABSPATH' ) ) { define( 'ABSPATH', __DIR__ . '/' ); }",
            "require_once ABSPATH . 'wp-settings.php';",
        ]
        (self.site / "wp-config.php").write_text("\n".join(lines) + "\n")

    def _start_php_server(self) -> None:
        # Several workers: the daemon's callback, a browser and a CLI enqueue may all be in flight at once.
        env = {**os.environ, "PHP_CLI_SERVER_WORKERS": "4"}
        proc = self._spawn(["php", "-S", f"127.0.0.1:{self.port}", "-t", str(self.site),
                            str(self.site / "st-router.php")], self.root / "php-server.log", env=env,
                           cwd=self.site)

        def up() -> bool:
            if proc.poll() is not None:
                raise AssertionError(f"php -S exited: {(self.root / 'php-server.log').read_text()[-2000:]}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                    return True
            except OSError:
                return False

        wait_for(up, timeout=30, interval=0.1, what="php -S listening")

    # --- using the site --------------------------------------------------------------------------
    def php(self, code: str, *, install: bool = False, timeout: float = 60) -> Any:
        """Run `code` (a PHP function body) inside WordPress and return its JSON-encoded return value."""
        script = self.root / f"cli-{secrets.token_hex(4)}.php"
        install_code = """
            define( 'WP_INSTALLING', true );
            require ST_TEST_SITE . '/wp-load.php';
            require_once ABSPATH . 'wp-admin/includes/upgrade.php';
            $r = wp_install( 'SalesTrainer test', 'admin', 'admin@example.invalid', false, '', wp_generate_password() );
            update_option( 'permalink_structure', '/%postname%/' );
            return ! empty( $r['user_id'] );
        """ if install else "require ST_TEST_SITE . '/wp-load.php';\n" + code
        script.write_text(
            "<?php\n"
            f"$_SERVER['HTTP_HOST'] = '127.0.0.1:{self.port}';\n"
            "$_SERVER['REQUEST_URI'] = '/';\n"
            "$_SERVER['SERVER_PROTOCOL'] = 'HTTP/1.1';\n"
            f"const ST_TEST_SITE = {php_literal(str(self.site))};\n"
            "$st_result = ( function () {\n" + install_code + "\n} )();\n"
            f"echo {php_literal(OUTPUT_MARK)} . json_encode( $st_result );\n")
        try:
            r = subprocess.run(["php", str(script)], capture_output=True, timeout=timeout, cwd=self.site)
        finally:
            script.unlink()
        out = r.stdout.decode(errors="replace")
        if r.returncode != 0 or OUTPUT_MARK not in out:
            raise AssertionError(f"php failed ({r.returncode}):\n{out[-3000:]}\n{r.stderr.decode()[-3000:]}")
        return json.loads(out.rsplit(OUTPUT_MARK, 1)[1])

    def job(self, job_id: str) -> dict[str, Any] | None:
        """The plugin's stored record of a job (salestrainer_sidecar_get_job)."""
        row = self.php(f"return salestrainer_sidecar_get_job( {php_literal(job_id)} );")
        return dict(row) if row else None

    def hooks(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.hook_log.read_text().splitlines() if line]

    def post_callback(self, body: dict[str, Any] | bytes, headers: dict[str, str] | None = None
                      ) -> tuple[int, dict[str, Any]]:
        """POST to the plugin's route as the daemon does; (status, decoded JSON reply)."""
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        request = urllib.request.Request(self.callback_url, data=data, method="POST",
                                         headers={"Content-Type": "application/json", **(headers or {})})
        try:
            with urllib.request.urlopen(request, timeout=30) as r:
                return r.status, json.loads(r.read() or b"null")
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read() or b"null")

    @property
    def login_url(self) -> str:
        return f"{self.url}/?st_test_login={self.login_key}"
