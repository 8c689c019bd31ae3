"""A rule whose only output is a directory (a tree artifact)."""

def _tree_impl(ctx):
    out = ctx.actions.declare_directory(ctx.label.name)
    ctx.actions.run_shell(
        outputs = [out],
        command = """
set -eu
mkdir -p "$1/sub/deeper" "$1/other/leaf"
printf 'top level\\n' > "$1/a.txt"
printf '%s\\n' "$2" > "$1/label.txt"
awk 'BEGIN { for (i = 0; i < 5000; i++) print "tree", i }' > "$1/sub/b.txt"
printf 'nested two levels\\n' > "$1/sub/deeper/c.txt"
printf '#!/bin/sh\\necho hi\\n' > "$1/sub/deeper/run.sh"
chmod +x "$1/sub/deeper/run.sh"
printf 'x' > "$1/other/leaf/d.txt"
""",
        arguments = [out.path, ctx.attr.content],
        mnemonic = "MakeTree",
        progress_message = "Making tree artifact %s" % out.short_path,
    )
    return [DefaultInfo(files = depset([out]))]

tree_artifact = rule(
    implementation = _tree_impl,
    attrs = {"content": attr.string()},
)
