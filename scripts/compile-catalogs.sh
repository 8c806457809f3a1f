#!/bin/sh
# Compile the gettext catalogs (gateway/locale/*/LC_MESSAGES/metalav.po -> .mo).
# The .mo files are committed so a wheel built anywhere ships them (msgfmt comes from
# the `gettext` package); tests/gateway/test_i18n.py fails when a .mo is stale.
# To collect new messages: xgettext --language=Python --keyword=_ --keyword=N_
#   --from-code=UTF-8 -o /tmp/metalav.pot gateway/ctl.py gateway/api.py gateway/operator.py
#   gateway/ctl_kit.py gateway/doctor.py gateway/backup.py gateway/profiles.py
set -eu
cd "$(dirname "$0")/.."
for po in gateway/locale/*/LC_MESSAGES/*.po; do
    msgfmt --check --output-file="${po%.po}.mo" "$po"
done
