"""Running the suite on other kernels, in VMs (tools/check --kernel).

Only what tools/check needs to parse its arguments lives here, so that a
run on the host imports none of the VM machinery.
"""

ACCELS = ("auto", "kvm", "tcg")
