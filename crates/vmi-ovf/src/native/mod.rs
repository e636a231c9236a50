//! Native hypervisor configurations generated from, and (VMX, libvirt) parsed into, a
//! [`crate::HardwareProfile`]: VMware `.vmx`, libvirt domain XML for KVM, VirtualBox
//! `VBoxManage` import settings.

pub mod libvirt;
pub mod vbox;
pub mod vmx;
