"""Where things are: on the GUESTBUS ISO, and in the guest once installed.

One module so the ISO builder (host), the installer (run from the ISO, before the agent is
installed) and the agent agree on every name. Standard library only, CPython 3.9+; the
installer carries its own copy of the few names it needs (it runs before this package is
installed), and a test checks the two agree.
"""

ISO_LABEL = "GUESTBUS"

# --- on the ISO (root directory; these are the Rock Ridge and Joliet names) ---
ISO_CONFIG = "config.json"  # the agent config (see AgentConfig), with config_serial
ISO_CA = "ca.pem"  # the cluster CA bundle
ISO_CERT = "client.crt"  # the VM's client certificate
ISO_KEY = "client.key"  # its private key (Rock Ridge mode 0600)
ISO_DR_KEY = "dr-verify.pem"  # Ed25519 public key that verifies signed DR changes
ISO_INSTALLER = "install.py"  # the installer (stdlib only)
ISO_INSTALL_SH = "install.sh"  # `sh install.sh` finds python3 and runs install.py
ISO_UNIT = "guestbus-agent.service"  # the systemd unit the installer puts in place
ISO_README = "README.txt"
ISO_WHEELS = "wheels"  # directory, `full` ISOs only: the offline wheelhouse
WHEELHOUSE_MANIFEST = "wheelhouse.json"  # in ISO_WHEELS: agent version, files, sha256

# --- installed in the guest ---
PREFIX = "/opt/guestbus"
VENV = PREFIX + "/venv"
AGENT_BIN = VENV + "/bin/guestbus-agent"
ETC_DIR = "/etc/guestbus"
CONFIG_PATH = ETC_DIR + "/config.json"  # 0600 root
DR_KEY_PATH = ETC_DIR + "/dr-verify.pem"  # 0644
UNIT_NAME = "guestbus-agent.service"
UNIT_PATH = "/etc/systemd/system/" + UNIT_NAME
STATE_DIR = "/var/lib/guestbus"  # the agent's state: tls/ (0700), derived config
ISO_MOUNT_DIR = "/run/guestbus/iso"  # where the agent mounts the ISO itself when it must
AGENT_DIST = "guestbus-agent"  # the wheel's distribution name
