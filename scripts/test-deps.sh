#!/bin/sh
# System packages some tests use: Chromium + ChromeDriver (browser test of the chat page),
# OpenSSH server (SSH launcher test), iproute2 (network-namespace cluster test),
# Prometheus for promtool (checks of observability/'s scrape config and of the metrics endpoint).
# Installs what is missing when run as root with apt-get; otherwise those tests skip.
set -u
need=""
command -v chromium >/dev/null 2>&1 || need="$need chromium"
command -v chromedriver >/dev/null 2>&1 || need="$need chromium-driver"
[ -x /usr/sbin/sshd ] || need="$need openssh-server"
command -v ip >/dev/null 2>&1 || need="$need iproute2"
{ command -v promtool >/dev/null 2>&1 || [ -x /usr/bin/prometheus ]; } || need="$need prometheus"
[ -z "$need" ] && exit 0
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "installing test dependencies:$need"
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $need) >/dev/null 2>&1 \
    || echo "warning: could not install$need; the tests that need them will be skipped"
  # Debian's prometheus package enables (and where it can, starts) a Prometheus server: the tests need only promtool
  case "$need" in *prometheus*)
    (systemctl disable --now prometheus || service prometheus stop) >/dev/null 2>&1 ;;
  esac
else
  echo "note: missing$need (not root or no apt-get); the tests that need them will be skipped"
fi
exit 0
